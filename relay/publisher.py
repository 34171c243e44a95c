"""Publishing accepted webhooks with publisher confirms, shared by all in-flight requests.

One connection and one confirm-mode channel serve every request: publishes from concurrent
requests pipeline on the channel and each awaits only its own confirm.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog
from aio_pika.abc import AbstractConnection, AbstractExchange
from aiormq.exceptions import DeliveryError, PublishError

from relay import topology, wire
from relay.broker import BROKER_ERRORS, keep_connected
from relay.errors import BrokerUnavailable, Unroutable
from relay.providers import Event
from relay.settings import Settings

log = structlog.get_logger()


class Publisher:
    """Keeps a confirm-mode channel to the exchange; `publish` fails fast while it is down."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._exchange: AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._exchange is not None

    def start(self) -> None:
        self._task = asyncio.create_task(
            keep_connected(self._settings.broker.url, self._session, what="publisher")
        )

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _session(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        channel.close_callbacks.add(lambda *_: lost.set())
        await topology.declare(channel, topology.ingress(self._settings))
        self._exchange = await channel.get_exchange(self._settings.broker.exchange, ensure=False)
        try:
            await lost.wait()
        finally:
            self._exchange = None

    async def publish(self, event: Event) -> None:
        """Publish persistently and wait for the broker's confirm; raise if not confirmed."""
        exchange = self._exchange
        if exchange is None:
            raise BrokerUnavailable("broker not connected")
        msg = wire.webhook(event, datetime.now(UTC))
        try:
            async with asyncio.timeout(self._settings.broker.publish_timeout_seconds):
                await exchange.publish(msg, event.routing_key, mandatory=True)
        except PublishError:
            raise Unroutable("returned by the broker: no queue is bound for it") from None
        except DeliveryError:
            raise BrokerUnavailable("broker refused the message (nack)") from None
        except TimeoutError:
            raise BrokerUnavailable("no confirm within the publish timeout") from None
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}") from None
