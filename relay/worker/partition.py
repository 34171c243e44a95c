"""One partition queue of one handler: a window of deliveries, queued per ordering key.

Order rests on one broker fact (docs/RABBITMQ.md, "Returned deliveries keep their order"):
deliveries a consumer holds unacked go back to the head of the queue, in their original order,
when its channel closes or its process dies. So a partition holds a window of deliveries (about
`window_bytes` of messages, at most `window`: relay/worker/keys.py), hands the head of every
key to the handler's deliveries at once, acks each message
when its outcome is final (delivered, or dead-lettered with a confirm) and recorded in the
handler's outcome log (confirmed), and never nacks: a stop, a crash or a cut returns the unacked
rest in order.

A partition knows its handler's deliveries only as a `Scheduler` (below); they know a message
only as a `Delivery`, which settles through its own partition: imports point one way, from
relay/worker/scheduler.py to here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from relay import metrics, wire
from relay.broker import BROKER_ERRORS, until_set
from relay.settings import HandlerSettings
from relay.worker.changes import Changes, Fence
from relay.worker.decided import Decided
from relay.worker.delivery import Outcome
from relay.worker.keys import KeyQueues, Sizes, prefetch

log = structlog.get_logger()

DRAIN_MARGIN_SECONDS = 5.0  # beyond a handler's timeout, how long in-flight deliveries may take
# A quorum queue may not yet have applied acks sent just before the channel closes: those
# messages would come again (docs/RABBITMQ.md). On a graceful stop the channel stays open
# this long after the last outcome.
ACKS_SETTLE_SECONDS = 0.5
ACK_QUEUE_SECONDS = 1.0
WRITE_RETRY_SECONDS = 1.0  # a dead letter or outcome record the broker did not confirm


class Scheduler(Protocol):
    """What a partition needs of its handler's deliveries (HandlerScheduler in
    relay/worker/scheduler.py): to be handed each key's head, to write what a final outcome
    needs written, and to know what partition changes released."""

    decided: Decided  # the handler's outcome log as read, for repeats

    def ready(self, delivery: Delivery) -> None:
        """`delivery` is its key's head: deliver it as soon as the policy allows."""

    def forget(self, delivery: Delivery) -> None:
        """`delivery` no longer waits for another try (final, or its channel closed)."""

    def release_of(self, change: str, bucket: int) -> frozenset[str] | None:
        """If `change` released `bucket`: the ids it delivered from elsewhere."""

    def is_released(self, change: str, bucket: int) -> bool: ...

    async def dead_letter(self, delivery: Delivery, outcome: Outcome, reason: str) -> None:
        """Publish `delivery`'s dead letter, confirmed."""

    async def record_outcome(
        self, delivery: Delivery, outcome: Outcome, dead_letter: str | None
    ) -> None:
        """Append `delivery`'s final outcome to the handler's outcome log, confirmed."""

    async def record(self, message: aio_pika.Message) -> None:
        """Append a record to relay.state, confirmed."""


class InFlight:
    """A partition's deliveries in flight: `with in_flight:` around each; a stop waits for
    them to end."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *_: object) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def drained(self, seconds: float) -> None:
        """Until none is in flight, or for `seconds` at most."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)


@dataclass(slots=True, eq=False)
class Delivery:
    """A message of a partition's window."""

    partition: Partition
    generation: int  # of the channel it came on: when that closes, it will come again
    tag: int
    key: str
    bucket: int
    held_by: str | None  # the partition change holding its bucket when it arrived
    message_id: str
    body: bytes
    properties: Any  # pamqp BasicProperties: headers, message_id, ...
    earlier: int  # deliveries of it before this one (the quorum queue's x-delivery-count)
    attempts: int = 0  # tries in this process
    first_attempt: datetime | None = None
    not_before: float = 0.0  # a retry waits until then (monotonic clock)
    failed: bool = False  # counted among the handler's messages awaiting another try
    arrived: float = field(default_factory=time.time)  # when it reached the window
    head_at: float = 0.0  # when it became its key's head (both by the wall clock: traces)

    @property
    def stale(self) -> bool:
        return self.generation != self.partition.generation

    @property
    def queue(self) -> str:
        """The queue it came from."""
        return self.partition.queue

    @property
    def in_flight(self) -> InFlight:
        """Its partition's deliveries in flight, to count it among them while it is."""
        return self.partition.in_flight

    async def settle(self, outcome: Outcome, dead_letter: str | None) -> None:
        """Its outcome is final: dead-letter it (when `dead_letter` says why), record the
        outcome, ack it, go on with its key (Partition.settle)."""
        await self.partition.settle(self, outcome, dead_letter)

    @property
    def replay(self) -> str:
        """The id of the replay from the archive sending it again, if one does."""
        replayed = (self.properties.headers or {}).get(wire.REPLAYED_HEADER)
        return replayed if isinstance(replayed, str) else ""

    @property
    def sent_again(self) -> bool:
        """Whether it is sent again on purpose (a replay from the archive, `relay dlq replay`):
        delivered whatever the outcome log says."""
        return bool((self.properties.headers or {}).get(wire.REPLAYED_HEADER))

    @property
    def attempt(self) -> int:
        """The number of the current try, for the x-relay-attempt header: after the tries
        before it, this process's or the broker's earlier deliveries, whichever are more."""
        return max(self.earlier, self.attempts - 1) + 1


@dataclass(slots=True, eq=False)
class Partition:
    handler: HandlerSettings
    index: int
    scheduler: Scheduler
    replay_queue: str = ""  # set: a replay's queue (relay/replays.py), not partition `index`
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set: consumed no more
    generation: int = 0
    active: bool = False  # has had deliveries on its current channel
    in_flight: InFlight = field(default_factory=InFlight)
    _keys: KeyQueues[Delivery] = field(default_factory=KeyQueues)
    _sizes: Sizes = field(default_factory=Sizes)  # of the messages held so far: sizes the window
    _changes: Changes[Delivery] = field(default_factory=Changes)
    _blocked: list[Delivery] = field(default_factory=list)  # key heads a change holds
    _channel: Any = None  # the aiormq channel
    _tasks: set[asyncio.Future[None]] = field(default_factory=set)
    # this channel's read of the handler's outcome log up to its end, before its first decision
    _caught_up: asyncio.Future[None] | None = None

    @property
    def queue(self) -> str:
        return self.replay_queue or self.handler.queue(self.index)

    @property
    def prefetch(self) -> int:
        """The next channel's window: `window_bytes` of messages of the mean size held so far."""
        return prefetch(self.handler.window, self.handler.window_bytes, self._sizes.mean)

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
            await self._channel.basic_qos(prefetch_count=self.prefetch)
            await self._channel.basic_consume(self.queue, self._receive)
            await until_set(closed.wait(), over, self.ended)
            if not closed.is_set():  # stopping: nothing new starts, what is in flight finishes
                # The consumer stays: cancelling it would hand the queue (single active
                # consumer) to a standby while this channel still holds unacked messages, and
                # the standby would deliver later messages of their keys first. Closing the
                # channel returns them and hands over the queue at once.
                await self._drained()
                await until_set(asyncio.sleep(ACKS_SETTLE_SECONDS), closed)
        finally:
            self._forget_window()
            await self._drained()  # a delivery of the old channel must not overlap its copy
            await _close(channel)
        if closed.is_set() and not over.is_set() and not self.ended.is_set():
            raise ConnectionError(f"channel closed by the broker: {why[0]!r}")

    async def _receive(self, message: DeliveredMessage) -> None:
        # Runs in a task of its own, before the next delivery's: the window keeps queue order.
        properties = message.header.properties
        headers = properties.headers or {}
        tag = cast(int, cast(Basic.Deliver, message.delivery).delivery_tag)
        marker = wire.read_marker(headers, message.body)
        if marker is not None:
            await self._take_marker(marker, tag)
            return
        key = wire.key_of(properties)
        bucket = wire.bucket_of(headers, key)
        earlier = headers.get("x-delivery-count")
        delivery = Delivery(
            partition=self,
            generation=self.generation,
            tag=tag,
            key=key,
            bucket=bucket,
            held_by=self._changes.holder(bucket),
            message_id=properties.message_id or "?",
            body=message.body,
            properties=properties,
            earlier=earlier if isinstance(earlier, int) else 0,
        )
        self.active = True
        self._sizes.add(len(message.body))
        self._changes.arrived(delivery)
        if self._keys.add(delivery):
            self._heads(delivery)
            await self._next_of_key(delivery)

    async def _next_of_key(self, delivery: Delivery) -> None:
        """`delivery` is its key's head: deliver it, unless a partition change holds it (or
        made it a duplicate: delivered from its old partition, or by a replay)."""
        if delivery.held_by is not None:
            duplicates = self.scheduler.release_of(delivery.held_by, delivery.bucket)
            if duplicates is None:
                self._blocked.append(delivery)
                return
            if delivery.message_id in duplicates:
                log.debug("delivered elsewhere during a change", change=delivery.held_by,
                          partition=self.queue, message_id=delivery.message_id)  # fmt: skip
                await self._finish(delivery)
                return
        if not delivery.sent_again:
            repeat = await self._is_repeat(delivery)
            if repeat is None:
                return  # its channel closed meanwhile: it comes again
            if repeat:
                log.debug("repeat: its outcome is recorded, not delivered again",
                          partition=self.queue, message_id=delivery.message_id)  # fmt: skip
                await self._finish(delivery)
                return
        self.scheduler.ready(delivery)

    async def _is_repeat(self, delivery: Delivery) -> bool | None:
        """Whether the handler's outcome log records an outcome of `delivery`'s id, read up to
        its end as of this channel's first decision (None: the channel closed first)."""
        if self._caught_up is None:
            self._caught_up = asyncio.ensure_future(self.scheduler.decided.caught_up())
        caught_up = self._caught_up
        await asyncio.wait({caught_up})  # cancelled when the window is forgotten
        if caught_up.cancelled() or delivery.stale:
            return None
        caught_up.result()
        return self.scheduler.decided.is_repeat(delivery.message_id)

    async def settle(self, delivery: Delivery, outcome: Outcome, dead_letter: str | None) -> None:
        """`delivery`'s outcome is final: dead-letter it (when `dead_letter` says why), record
        the outcome in the handler's outcome log, ack it, release its key's next message. Each
        step waits for the broker's confirm of the one before: a message is acked only once its
        outcome is recorded (a crash in between: it comes again, and the record says what
        became of it). A step the broker does not confirm (a stream's leader lost in a cluster,
        say) is tried again while the channel lasts: its key waits, the others go on."""
        self.scheduler.forget(delivery)
        if dead_letter is not None and not await self._until_written(
            "dead letter",
            delivery,
            lambda: self.scheduler.dead_letter(delivery, outcome, dead_letter),
        ):
            return
        if not await self._until_written(
            "outcome",
            delivery,
            lambda: self.scheduler.record_outcome(delivery, outcome, dead_letter),
        ):
            return
        await self._finish(delivery)

    async def _until_written(
        self, what: str, delivery: Delivery, write: Callable[[], Awaitable[None]]
    ) -> bool:
        """Whether `write` was confirmed before `delivery`'s channel closed (it comes again)."""
        while not delivery.stale:
            try:
                await write()
            except BROKER_ERRORS as exc:
                log.warning(f"{what} not written, trying again", error=repr(exc),
                            partition=self.queue, message_id=delivery.message_id)  # fmt: skip
                await asyncio.sleep(WRITE_RETRY_SECONDS)
                continue
            return True
        return False

    async def _finish(self, delivery: Delivery) -> None:
        """Ack `delivery`; pass the fences waiting for it; go on with its key."""
        if not await self._ack(delivery.tag):
            return
        for fence in self._changes.done(delivery):
            self._pass(fence)
        following = self._keys.done(delivery)
        if following is not None:
            self._heads(following)
            await self._next_of_key(following)

    def _heads(self, delivery: Delivery) -> None:
        """`delivery` is its key's head now: export how long it waited behind older messages
        of its key (0 for most)."""
        delivery.head_at = time.time()
        metrics.KEY_WAIT_SECONDS.labels(self.handler.name).observe(
            max(0.0, delivery.head_at - delivery.arrived)
        )

    async def _ack(self, tag: int) -> bool:
        try:
            # Queued to the connection's writer, not awaited through it; its bounded queue
            # blocks only when the connection is dead, which the timeout then tells.
            async with asyncio.timeout(ACK_QUEUE_SECONDS):
                await self._channel.basic_ack(tag, wait=False)
        except (*BROKER_ERRORS, TimeoutError) as exc:
            log.warning("ack not sent: the message will come again", error=repr(exc),
                        partition=self.queue)  # fmt: skip
            return False
        return True

    # --- partition changes --------------------------------------------------------------------

    async def _take_marker(self, marker: wire.Marker, tag: int) -> None:
        acks, passed = self._changes.marker(marker, tag, self._keys, self.scheduler.is_released)
        for ack in acks:
            await self._ack(ack)
        if passed is not None:
            self._pass(passed)

    def _pass(self, fence: Fence[Delivery]) -> None:
        """Every earlier message of the fence's buckets is done: release them (retried until
        the record is written, while this channel lasts), then ack the markers."""
        task = asyncio.ensure_future(self._write_release(fence, self.generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_release(self, fence: Fence[Delivery], generation: int) -> None:
        record = wire.release_record(
            handler=self.handler.name,
            change=fence.change,
            buckets=sorted(fence.buckets),
            duplicates=sorted(fence.duplicates),
        )
        while generation == self.generation:
            try:
                await self.scheduler.record(record)
            except (*BROKER_ERRORS, TimeoutError) as exc:
                log.warning("release not written, trying again", error=repr(exc),
                            partition=self.queue, change=fence.change)  # fmt: skip
                await asyncio.sleep(1)
                continue
            log.info("partition change: buckets released", partition=self.queue,
                     change=fence.change, buckets=sorted(fence.buckets))  # fmt: skip
            for tag in fence.tags:
                await self._ack(tag)
            return

    async def on_release(self, change: str, buckets: frozenset[int]) -> None:
        """A release of `change` arrived: deliver what its buckets held here."""
        for tag in self._changes.holds_released(change, self.scheduler.is_released):
            await self._ack(tag)
        free = [d for d in self._blocked if d.held_by == change and d.bucket in buckets]
        self._blocked = [d for d in self._blocked if d not in free]
        for delivery in free:
            if not delivery.stale:
                await self._next_of_key(delivery)

    async def _drained(self) -> None:
        await self.in_flight.drained(self.handler.timeout_seconds + DRAIN_MARGIN_SECONDS)

    def _forget_window(self) -> None:
        self.generation += 1
        if self._caught_up is not None:
            self._caught_up.cancel()
            self._caught_up = None
        for delivery in self._keys:
            self.scheduler.forget(delivery)
        self._keys.clear()
        self._changes.clear()
        self._blocked.clear()


async def _close(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        with contextlib.suppress(*BROKER_ERRORS, TimeoutError):
            await asyncio.wait_for(channel.close(), 5)
