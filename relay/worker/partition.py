"""One partition queue of one handler: a window of deliveries, queued per ordering key.

Order rests on one broker fact (docs/RABBITMQ.md, "Returned deliveries keep their order"):
deliveries a consumer holds unacked go back to the head of the queue, in their original order,
when its channel closes or its process dies. So a partition holds a window of `window`
deliveries, hands the head of every key to the handler's deliveries at once, acks each message
when its outcome is final (delivered, or dead-lettered with a confirm), and never nacks: a stop,
a crash or a cut returns the unacked rest in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from relay import wire
from relay.broker import BROKER_ERRORS, until_set
from relay.settings import HandlerSettings
from relay.worker.delivery import Outcome
from relay.worker.keys import KeyQueues

if TYPE_CHECKING:
    from relay.worker.handler import HandlerDeliveries

log = structlog.get_logger()

DRAIN_MARGIN_SECONDS = 5.0  # beyond a handler's timeout, how long in-flight deliveries may take
# A quorum queue may not yet have applied acks sent just before the channel closes: those
# messages would come again (docs/RABBITMQ.md). On a graceful stop the channel stays open
# this long after the last outcome.
ACKS_SETTLE_SECONDS = 0.5


@dataclass(slots=True, eq=False)
class Delivery:
    """A message of a partition's window."""

    partition: Partition
    generation: int  # of the channel it came on: when that closes, it will come again
    tag: int
    key: str
    message_id: str
    body: bytes
    properties: Any  # pamqp BasicProperties: headers, message_id, ...
    earlier: int  # deliveries of it before this one (the quorum queue's x-delivery-count)
    attempts: int = 0  # tries in this process
    first_attempt: datetime | None = None
    not_before: float = 0.0  # a retry waits until then (monotonic clock)
    failed: bool = False  # counted among the handler's messages awaiting another try

    @property
    def stale(self) -> bool:
        return self.generation != self.partition.generation

    @property
    def attempt(self) -> int:
        """The number of the current try, for the x-relay-attempt header: after the tries
        before it, this process's or the broker's earlier deliveries, whichever are more."""
        return max(self.earlier, self.attempts - 1) + 1


@dataclass(slots=True, eq=False)
class Partition:
    handler: HandlerSettings
    index: int
    deliveries: HandlerDeliveries
    generation: int = 0
    active: bool = False  # has had deliveries on its current channel
    in_flight: int = 0
    _keys: KeyQueues[Delivery] = field(default_factory=KeyQueues)
    _channel: Any = None  # the aiormq channel
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def queue(self) -> str:
        return self.handler.queue(self.index)

    async def consume(self, connection: AbstractConnection, over: asyncio.Event) -> None:
        """Deliver until `over` is set or the broker closes the channel; what is unacked then
        goes back to the head of the queue."""
        channel = await connection.channel(publisher_confirms=False)
        closed = asyncio.Event()
        why: list[object] = []

        def on_close(_: object, exc: BaseException | None = None) -> None:
            why.append(exc)
            closed.set()

        channel.close_callbacks.add(on_close)
        self._channel = await channel.get_underlay_channel()
        self.active = False
        try:
            await self._channel.basic_qos(prefetch_count=self.handler.window)
            consuming = await self._channel.basic_consume(self.queue, self._receive)
            await until_set(closed.wait(), over)
            if not closed.is_set():  # stopping: take no more, finish what is in flight
                with contextlib.suppress(*BROKER_ERRORS):
                    await self._channel.basic_cancel(consuming.consumer_tag)
                await self._drained()
                await until_set(asyncio.sleep(ACKS_SETTLE_SECONDS), closed)
        finally:
            self._forget_window()
            await self._drained()  # a delivery of the old channel must not overlap its copy
            await _close(channel)
        if closed.is_set() and not over.is_set():
            raise ConnectionError(f"channel closed by the broker: {why[0]!r}")

    async def _receive(self, message: DeliveredMessage) -> None:
        # Runs in a task of its own, before the next delivery's: the window keeps queue order.
        properties = message.header.properties
        headers = properties.headers or {}
        earlier = headers.get("x-delivery-count")
        delivery = Delivery(
            partition=self,
            generation=self.generation,
            tag=cast(int, cast(Basic.Deliver, message.delivery).delivery_tag),
            key=wire.key_of(properties),
            message_id=properties.message_id or "?",
            body=message.body,
            properties=properties,
            earlier=earlier if isinstance(earlier, int) else 0,
        )
        self.active = True
        if self._keys.add(delivery):
            self.deliveries.ready(delivery)

    async def settle(self, delivery: Delivery, outcome: Outcome, dead_letter: str | None) -> None:
        """`delivery`'s outcome is final: dead-letter it (when `dead_letter` says why), ack it,
        release its key's next message."""
        self.deliveries.forget(delivery)
        if delivery.stale:
            return  # its channel is gone: the broker delivers it again
        try:
            if dead_letter is not None:
                await self.deliveries.dead_letter(delivery, outcome, dead_letter)
            await self._channel.basic_ack(delivery.tag)
        except BROKER_ERRORS as exc:
            log.warning("outcome not recorded: the message will come again", error=repr(exc),
                        partition=self.queue, message_id=delivery.message_id)  # fmt: skip
            return
        following = self._keys.done(delivery)
        if following is not None:
            self.deliveries.ready(following)

    def started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def finished(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def _drained(self) -> None:
        if self.in_flight:
            timeout = self.handler.timeout_seconds + DRAIN_MARGIN_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)

    def _forget_window(self) -> None:
        self.generation += 1
        for delivery in self._keys:
            self.deliveries.forget(delivery)
        self._keys.clear()


async def _close(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        with contextlib.suppress(*BROKER_ERRORS, TimeoutError):
            await asyncio.wait_for(channel.close(), 5)
