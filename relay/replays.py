"""Replaying archived messages to one handler, each key in acceptance order: `relay replay`, and
the backfill of a new handler (its `backfill` option).

A replay is a record in relay.state (wire.replay_record) with three changes of the partition
change machinery (relay/worker/changes.py):
- `before`: `mark` puts REPLAY into each partition of the handler. A partition releases `before`
  once it has done every message it held ahead of the marker, and holds what comes after it.
- `fill`: an attempt (`fill`) declares a replay queue that starts with HOLD(fill), puts CUT into
  the archive, copies the archived messages of the replay up to that CUT into the queue, closes
  it with FENCE(after) and releases `fill`. Workers deliver the replay queue only once `fill`
  and `before` are both released: never ahead of an older message still in a partition.
- `after`: released when the replay queue is done; the partitions then deliver what they held,
  skipping the ids the replay delivered that may be in both (accepted from SKEW_SECONDS before
  the markers on: the FENCE lists them).

An attempt that ends before it releases `fill` delivered nothing: the next one deletes its queue
and starts again. Whoever fills holds the handler's turn (an exclusive queue): `relay replay`
while it runs, else a worker of the handler (relay/worker/worker.py), which also takes over a
backfill, whose markers go into the new partitions before their bindings exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from relay import topology, wire
from relay.broker import BROKER_ERRORS
from relay.errors import RelayError
from relay.settings import HandlerSettings, duration_seconds

log = structlog.get_logger()

SETTLE_SECONDS = 1.0  # routing decisions made before the markers reach the archive by then
SKEW_SECONDS = 5.0  # clocks of ingress replicas may differ by this much
IN_FLIGHT = 500  # copies awaiting their confirm at once
READ_PREFETCH = 1000
IDLE_SECONDS = 1.0  # a dry run reads until the archive has been quiet this long
ALL_BUCKETS = list(range(wire.BUCKETS))
EPOCH = datetime.fromtimestamp(0, UTC)  # accepted at an unknown time


@dataclass(frozen=True, slots=True)
class Replay:
    """What to send again to one handler: its archived messages accepted in [since, until]."""

    handler: str
    id: str
    since: datetime
    until: datetime | None = None
    keys: tuple[str, ...] = ()  # ordering keys; () is every key
    events: tuple[str, ...] = ()  # topic patterns over routing keys; () is every bound one

    @classmethod
    def new(cls, handler: str, since: datetime, **options: Any) -> Replay:
        return cls(handler, uuid.uuid4().hex[:12], since, **options)

    @classmethod
    def backfill(cls, handler: HandlerSettings) -> Replay:
        """The backfill of a new handler: the archive from its `backfill` before now."""
        back = timedelta(seconds=duration_seconds(handler.backfill or "") or 0)
        return cls.new(handler.name, datetime.now(UTC) - back)

    @classmethod
    def of(cls, record: dict[str, Any]) -> Replay:
        until = record.get("until")
        return cls(
            handler=str(record["handler"]),
            id=str(record["replay"]),
            since=datetime.fromisoformat(record["since"]),
            until=datetime.fromisoformat(until) if until else None,
            keys=tuple(record.get("keys") or ()),
            events=tuple(record.get("events") or ()),
        )

    @property
    def before(self) -> str:
        return f"{self.id}.before"

    @property
    def fill(self) -> str:
        return f"{self.id}.fill"

    @property
    def after(self) -> str:
        return f"{self.id}.after"

    @property
    def turn(self) -> str:
        """The exclusive queue whoever fills this handler's replays holds."""
        return f"relay.replaying.{self.handler}"

    def queue(self, attempt: int) -> str:
        return f"relay.{self.handler}.replay-{self.id}-{attempt}"

    def record(self) -> aio_pika.Message:
        return wire.replay_record(
            handler=self.handler,
            replay=self.id,
            since=self.since.isoformat(),
            until=self.until.isoformat() if self.until else None,
            keys=list(self.keys),
            events=list(self.events),
            before=self.before,
            fill=self.fill,
            after=self.after,
        )

    def wants(self, handler: HandlerSettings, message: Archived) -> bool:
        """Whether an archived message (not a marker) belongs to this replay."""
        routing_key, received = message.routing_key, message.received_at
        if received < self.since or (self.until is not None and received > self.until):
            return False
        if not any(wire.topic_matches(p, routing_key) for p in handler.bindings):
            return False
        if self.events and not any(wire.topic_matches(p, routing_key) for p in self.events):
            return False
        return not self.keys or wire.key_of(message.properties) in self.keys


async def begin(channel: AbstractChannel, handler: HandlerSettings, replay: Replay) -> None:
    """Record the replay, then mark the handler's partitions. `channel` confirms."""
    await _publish(channel, replay.record(), topology.STATE_STREAM)
    await mark(channel, handler, replay)


async def mark(channel: AbstractChannel, handler: HandlerSettings, replay: Replay) -> None:
    """REPLAY into each partition of `handler`, then the `marked` record. Doing it again is
    harmless: a partition holds what follows the first marker, and fences what precedes each."""
    for index in range(handler.partitions):
        buckets = [b for b in ALL_BUCKETS if wire.partition(b, handler.partitions) == index]
        marker = wire.marker(wire.REPLAY, replay.after, buckets, before=replay.before)
        await _publish(channel, marker, handler.queue(index))
    await _publish(
        channel, wire.marked_record(handler=handler.name, replay=replay.id), topology.STATE_STREAM
    )


async def fill(
    connection: AbstractConnection,
    exchange: str,
    handler: HandlerSettings,
    replay: Replay,
    *,
    attempt: int,
    marked_at: datetime,
    progress: Callable[[int], None] | None = None,
) -> Counter[str]:
    """Fill the replay's queue of `attempt` (see the module's docstring); what it queued, per
    routing key. The caller holds the replay's turn and has deleted earlier attempts' queues."""
    queue = replay.queue(attempt)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    async with channel:
        await channel.declare_queue(queue, durable=True, arguments=topology.PARTITION)
        await _publish(channel, wire.marker(wire.HOLD, replay.fill, ALL_BUCKETS), queue)
        attempt_record = wire.attempt_record(
            handler=handler.name, replay=replay.id, attempt=attempt, queue=queue
        )
        await _publish(channel, attempt_record, topology.STATE_STREAM)
        await asyncio.sleep(SETTLE_SECONDS)
        cut = f"{replay.id}-{attempt}"
        await _publish(channel, wire.cut(cut), topology.ARCHIVE)
        queued: Counter[str] = Counter()
        held = marked_at - timedelta(seconds=SKEW_SECONDS)  # from then on, maybe held too
        both: list[str] = []
        copies = _Copies(await channel.get_underlay_channel(), queue)
        async for message in read_archive(connection, exchange, replay.since, until=f"cut:{cut}"):
            if not replay.wants(handler, message):
                continue
            await copies.put(
                wire.replayed_from_archive(message.body, message.properties, replay.id)
            )
            queued[message.routing_key] += 1
            if message.received_at >= held:
                both.append(message.properties.message_id or "")
            if progress is not None:
                progress(queued.total())
        await copies.drain()
        await _publish(channel, wire.marker(wire.FENCE, replay.after, ALL_BUCKETS, ids=both), queue)
        release = wire.release_record(
            handler=handler.name, change=replay.fill, buckets=ALL_BUCKETS, duplicates=[]
        )
        await _publish(channel, release, topology.STATE_STREAM)
    log.info("replay queued", handler=handler.name, replay=replay.id, queue=queue,
             messages=queued.total())  # fmt: skip
    return queued


@dataclass(frozen=True, slots=True)
class Archived:
    """A message as the archive holds it."""

    routing_key: str
    properties: Any  # pamqp BasicProperties: headers, message_id, timestamp, ...
    body: bytes

    @property
    def received_at(self) -> datetime:
        return wire.received_at(self.body, self.properties) or EPOCH


async def read_archive(
    connection: AbstractConnection,
    exchange: str,
    since: datetime | None,
    *,
    until: str | None = None,
) -> AsyncIterator[Archived]:
    """The archive's messages published to `exchange` (the archive may serve several relays of a
    vhost) from about `since` on (an offset by time starts at a chunk, and clocks differ: from
    SKEW_SECONDS earlier; None: from the first it holds), in archive order, up to the marker whose
    id is `until`; with `until` None, until the archive has been quiet IDLE_SECONDS."""
    channel = await connection.channel(publisher_confirms=False)
    async with channel:
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=READ_PREFETCH)  # a stream consumer needs one
        arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        offset = "first" if since is None else since - timedelta(seconds=SKEW_SECONDS)
        # Each delivery is put from a task of its own, started in order: the queue keeps it.
        await raw.basic_consume(
            topology.ARCHIVE, arrived.put, arguments={"x-stream-offset": offset}
        )
        unacked = 0
        while True:
            if until is not None:
                message = await arrived.get()
            else:
                try:
                    message = await asyncio.wait_for(arrived.get(), IDLE_SECONDS)
                except TimeoutError:
                    return
            deliver = cast(Basic.Deliver, message.delivery)
            unacked += 1
            if unacked >= READ_PREFETCH // 2:  # credit for the next: nothing leaves a stream
                await raw.basic_ack(cast(int, deliver.delivery_tag), multiple=True)
                unacked = 0
            properties = message.header.properties
            if properties.message_id == until:
                return
            if deliver.exchange == exchange and not wire.is_marker(properties):
                yield Archived(deliver.routing_key or "", properties, message.body)


async def archive_reach(connection: AbstractConnection) -> datetime | None:
    """When the oldest message the archive still holds was accepted, if its retention has
    dropped older ones; None if it holds everything it ever took (its first offset is 0)."""
    channel = await connection.channel(publisher_confirms=False)
    async with channel:
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=1)
        first: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()

        async def take(message: DeliveredMessage) -> None:
            if not first.done():
                first.set_result(message)

        await raw.basic_consume(topology.ARCHIVE, take, arguments={"x-stream-offset": "first"})
        try:
            message = await asyncio.wait_for(first, IDLE_SECONDS)
        except TimeoutError:
            return None  # empty
    if (message.header.properties.headers or {}).get("x-stream-offset") == 0:
        return None
    return wire.received_at(message.body, message.header.properties) or EPOCH


class _Copies:
    """Publishes to one queue in order, with up to IN_FLIGHT awaiting their confirm."""

    def __init__(self, channel: Any, queue: str) -> None:
        self._channel, self._queue = channel, queue
        self._pending: deque[asyncio.Future[Any]] = deque()

    async def put(self, message: aio_pika.Message) -> None:
        # Started in order: each takes the channel's lock in turn, so they leave in this order.
        self._pending.append(
            asyncio.ensure_future(
                self._channel.basic_publish(
                    message.body,
                    routing_key=self._queue,
                    properties=message.properties,
                    mandatory=True,
                    wait=False,
                )
            )
        )
        if len(self._pending) >= IN_FLIGHT:
            await self._confirmed(self._pending.popleft())

    async def drain(self) -> None:
        while self._pending:
            await self._confirmed(self._pending.popleft())

    @staticmethod
    async def _confirmed(publish: asyncio.Future[Any]) -> None:
        if not isinstance(await publish, Basic.Ack):
            raise RelayError("the broker did not take a replayed message")


async def delete_queue(connection: AbstractConnection, name: str) -> None:
    """Delete a replay's queue, if it is still there."""
    with contextlib.suppress(*BROKER_ERRORS):
        channel = await connection.channel(publisher_confirms=False)
        async with channel:
            await channel.queue_delete(name)


async def _publish(channel: AbstractChannel, message: aio_pika.Message, queue: str) -> None:
    await channel.default_exchange.publish(message, queue, mandatory=True)
