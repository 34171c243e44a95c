"""Publishing accepted webhooks with publisher confirms, shared by all in-flight requests.

One connection and one confirm-mode channel serve every request: publishes from concurrent
requests pipeline on the channel and each awaits only its own confirm.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import aio_pika
import orjson
import structlog
from aio_pika.abc import AbstractConnection, AbstractExchange
from aiormq.exceptions import DeliveryError, PublishError

from relay import topology
from relay.broker import BROKER_ERRORS, keep_connected
from relay.errors import BrokerUnavailable, Unroutable
from relay.provider import Event
from relay.settings import Settings

log = structlog.get_logger()


def envelope(event: Event, received_at: datetime) -> bytes:
    """The message body (README "Routing"); `data` is spliced in as the provider sent it."""
    head = orjson.dumps(
        {
            "id": event.message_id,
            "source": event.source,
            "event": event.name,
            "type": event.type,
            "key": event.key,
            "occurred_at": event.occurred_at,
            "received_at": received_at.isoformat().replace("+00:00", "Z"),
        }
    )
    return head[:-1] + b',"data":' + event.data_json + b"}"


def message(event: Event, received_at: datetime, partition_counts: list[int]) -> aio_pika.Message:
    return aio_pika.Message(
        envelope(event, received_at),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event.message_id,
        timestamp=received_at,
        headers={
            "x-relay-source": event.source,
            "x-relay-event": event.name,
            topology.KEY_HEADER: event.key,
            **topology.partition_headers(event.key, partition_counts),
        },
    )


class Publisher:
    """Keeps a confirm-mode channel to the exchange; `publish` fails fast while it is down."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._partition_counts = topology.partition_counts(settings)
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
        await topology.declare(channel, topology.describe(self._settings, state=False))
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
        msg = message(event, datetime.now(UTC), self._partition_counts)
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
