"""Publishing accepted webhooks with publisher confirms, shared by all in-flight requests.

One connection and one confirm-mode channel serve every request: publishes from concurrent
requests pipeline on the channel and each awaits only its own confirm.

The hot path sits below aio-pika and aiormq's `basic_publish`, whose per-message objects cost
more than the rest of a request: relay.amqp encodes the frames, each publish takes the channel's
next delivery tag and appends its frames to an outbox in that order, and one writer task hands
the outbox to aiormq's write queue, where `basic_publish` puts its own: the publishes of a loop
iteration leave in one write, in tag order. aiormq still does the rest: it reads the broker's
acks, nacks and returns into the confirmation registered here, and fails every pending one when
the channel closes. Every use of aiormq's internals for this is in relay/_aiormq.py.

While the broker blocks the connection (a memory or disk alarm, relay.broker.Blocked), a publish
fails at once instead of waiting out `publish_timeout_seconds`: the ingress answers 503 with
Retry-After. Publishes already written when the block comes keep waiting for their confirm: the
broker confirms them once it unblocks, or they time out into a 503; either way no webhook is
answered 200 before the broker confirmed it.

A nack is answered 503, and the channel that got it is replaced by a new one, at most once every
RENEW_AFTER_NACK_SECONDS: a quorum queue that rejected a channel's publishes (`overflow:
reject-publish`) may go on rejecting that channel after the limit is gone (docs/RABBITMQ.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import cast

import aiormq
import structlog
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import DeliveryError, PublishError

from relay import _aiormq, amqp, provision, tracing, wire
from relay.broker import BROKER_ERRORS, Blocked, keep_connected, until_set
from relay.errors import BrokerUnavailable, Unroutable
from relay.providers import Event
from relay.settings import Settings

log = structlog.get_logger()

RENEW_AFTER_NACK_SECONDS = 5.0  # a channel nacked at least this long after it opened is replaced


class Publisher:
    """Keeps a confirm-mode channel to the exchange; `publish` fails fast while it is down."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._timeout = settings.broker.publish_timeout_seconds
        self._channel: aiormq.Channel | None = None
        self._frames: amqp.Publish | None = None
        self._outbox: list[bytes] = []  # frames of publishes with a tag, not yet queued
        self._wake = asyncio.Event()  # set when the outbox has something
        self._task: asyncio.Task[None] | None = None
        self._renew = asyncio.Event()  # set: replace the channel
        self._opened = 0.0  # loop time the channel opened
        self.blocked = Blocked("publisher")

    @property
    def ready(self) -> bool:
        return self._channel is not None

    def start(self) -> None:
        self._task = asyncio.create_task(
            keep_connected(
                self._settings.broker.connection_urls,
                self._session,
                what="publisher",
                blocked=self.blocked,
            )
        )

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _session(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        """Create what is missing of the topology (the configured handlers' among it) before
        the first publish: the ingress is ready only then. Then publish until the connection
        is lost."""
        async with connection.channel(publisher_confirms=True, on_return_raises=True) as channel:
            await provision.create_missing(
                connection, channel, self._settings, self._settings.handlers, by="ingress"
            )
        while not lost.is_set():
            await self._on_channel(connection, lost)

    async def _on_channel(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        """Publish on one channel until the connection is lost, or the channel closes (then the
        connection is given up too), or a nack asks for a new channel."""
        renew = self._renew = asyncio.Event()
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        channel.close_callbacks.add(lambda *_: None if renew.is_set() else lost.set())
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        frame_max = _aiormq.frame_max(underlay)
        self._frames = amqp.Publish(underlay.number, frame_max, self._settings.broker.exchange)
        self._outbox = []
        writer = asyncio.create_task(self._write(underlay, self._outbox))
        self._channel, self._opened = underlay, asyncio.get_running_loop().time()
        try:
            await until_set(lost.wait(), renew)
        finally:
            self._channel = None  # what is still unconfirmed, aiormq fails with the channel
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            if renew.is_set() and not lost.is_set():
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()

    async def _write(self, channel: aiormq.Channel, outbox: list[bytes]) -> None:
        """Move the outbox to aiormq's write queue, in order, whenever it has something."""
        queue = _aiormq.outgoing(channel)
        while True:
            await self._wake.wait()
            self._wake.clear()
            payload = b"".join(outbox)
            outbox.clear()
            await queue.put(_aiormq.frames(payload))

    async def publish(self, event: Event) -> None:
        """Publish persistently and wait for the broker's confirm; raise if not confirmed."""
        channel, frames = self._channel, self._frames
        if channel is None or frames is None:
            raise BrokerUnavailable("broker not connected")
        if self.blocked.reason is not None:
            raise BrokerUnavailable(f"broker blocked publishing: {self.blocked.reason}")
        received_at = datetime.now(UTC)
        message_id = event.message_id
        payload = frames.frames(
            wire.envelope(event, received_at),
            routing_key=event.routing_key,
            message_id=message_id,
            timestamp=int(received_at.timestamp()),
            headers=wire.webhook_headers(event, tracing.carrier() if tracing.ON else None),
        )
        confirmation, tag = _aiormq.expect_confirm(channel, message_id)  # failed if it closes
        expiry = asyncio.get_running_loop().call_later(self._timeout, _expire, confirmation)
        self._outbox.append(payload)  # written in tag order
        self._wake.set()
        try:
            await confirmation
        except PublishError:
            raise Unroutable("returned by the broker: no queue is bound for it") from None
        except DeliveryError:
            self._nacked(channel)
            raise BrokerUnavailable("broker refused the message (nack)") from None
        except TimeoutError:
            _aiormq.forget_confirm(channel, tag)
            raise BrokerUnavailable("no confirm within the publish timeout") from None
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}") from None
        finally:
            expiry.cancel()
            _aiormq.forget_return(channel, message_id, tag)

    def _nacked(self, channel: aiormq.Channel) -> None:
        """Replace the channel that got a nack, unless it is new: at most once per
        RENEW_AFTER_NACK_SECONDS while nacks go on."""
        age = asyncio.get_running_loop().time() - self._opened
        if channel is self._channel and age >= RENEW_AFTER_NACK_SECONDS:
            log.warning("publish channel renewed after a nack", component="publisher")
            self._renew.set()


def _expire(confirmation: asyncio.Future[object]) -> None:
    if not confirmation.done():
        confirmation.set_exception(TimeoutError())
