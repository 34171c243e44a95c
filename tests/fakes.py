"""Fakes at the worker's seams, to drive a partition and its handler's deliveries in-process, in
milliseconds: a partition queue and the aiormq channel consuming it, a confirm-mode publish, and
a handler (target). What the broker does is claimed only by the tests against the real broker;
the queue here keeps the one fact order rests on (docs/RABBITMQ.md): unacked deliveries go back
to the head of the queue, in their original order, when their channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
from aiormq.abc import DeliveredMessage
from pamqp import commands
from pamqp.header import ContentHeader

from relay import wire
from relay.config import from_dict as config_from_dict
from relay.settings import HandlerSettings
from relay.worker.delivery import Outcome, Verdict
from relay.worker.partition import Partition
from relay.worker.scheduler import HandlerScheduler
from tests.conftest import settings_dict

OK = Outcome(Verdict.SUCCESS, "HTTP 200", 200)
UNAVAILABLE = Outcome(Verdict.TRANSIENT, "HTTP 503", 503)
REJECTED = Outcome(Verdict.PERMANENT, "HTTP 422", 422)

Receive = Callable[[DeliveredMessage], Awaitable[None]]


class Changed:
    """Wakes a test whenever a fake did something: `await changed.until(predicate)`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._event.clear()
            await self._event.wait()


async def turns(n: int = 10) -> None:
    """Let the loop run `n` iterations (what is due now runs; nothing waits for time)."""
    for _ in range(n):
        await asyncio.sleep(0)


def delivered_message(
    tag: int,
    message_id: str,
    *,
    key: str = "invoice:7",
    body: bytes | None = None,
    headers: dict[str, Any] | None = None,
    delivery_count: int | None = None,
    channel: Any = None,
) -> DeliveredMessage:
    """A message as aiormq hands it to a consumer: Basic.Deliver and a content header whose
    properties carry the wire headers (x-relay-key, relay-bucket), message_id and, from the
    second delivery on, the quorum queue's x-delivery-count."""
    stamped: dict[str, Any] = {wire.KEY_HEADER: key, wire.BUCKET_HEADER: str(wire.bucket(key))}
    if delivery_count:
        stamped["x-delivery-count"] = delivery_count
    stamped.update(headers or {})
    content = body if body is not None else b'{"id": "%s"}' % message_id.encode()
    properties = commands.Basic.Properties(message_id=message_id, headers=stamped)
    return DeliveredMessage(
        delivery=commands.Basic.Deliver(consumer_tag="ctag", delivery_tag=tag),
        header=ContentHeader(body_size=len(content), properties=properties),
        body=content,
        channel=channel,
    )


def marker_message(tag: int, kind: str, change: str, buckets: list[int]) -> DeliveredMessage:
    """A partition change marker (relay/wire.py) as delivered."""
    message = wire.marker(kind, change, buckets)
    properties = commands.Basic.Properties(
        message_id=message.message_id, headers=dict(message.headers)
    )
    return DeliveredMessage(
        delivery=commands.Basic.Deliver(consumer_tag="ctag", delivery_tag=tag),
        header=ContentHeader(body_size=len(message.body), properties=properties),
        body=message.body,
        channel=cast(Any, None),
    )


@dataclass(eq=False)
class Queued:
    """A message in the fake queue: what it is, and how often it was delivered."""

    message_id: str
    key: str
    headers: dict[str, Any]
    kind: str = ""  # a marker's kind, else ""
    change: str = ""
    buckets: list[int] = field(default_factory=list)
    deliveries: int = 0
    body: bytes | None = None  # None: {"id": message_id}


class FakeQueue:
    """One partition queue: ready messages in order, handed to its consumer's channel."""

    def __init__(self, changed: Changed) -> None:
        self.ready: deque[Queued] = deque()
        self.acked: list[str] = []  # message ids, in the order acked
        self.changed = changed
        self.channel: FakeChannel | None = None

    def put(
        self,
        message_id: str,
        key: str = "invoice:7",
        *,
        headers: dict[str, Any] | None = None,
        delivered_before: int = 0,
        body: bytes | None = None,
    ) -> None:
        """Publish a message (`delivered_before`: times it was delivered and not acked)."""
        self.ready.append(
            Queued(message_id, key, headers or {}, deliveries=delivered_before, body=body)
        )
        if self.channel is not None:
            self.channel.pump()

    def put_marker(self, kind: str, change: str, buckets: list[int]) -> None:
        self.ready.append(Queued(f"marker:{change}:{kind}", "", {}, kind, change, buckets))
        if self.channel is not None:
            self.channel.pump()


class FakeChannel:
    """The aiormq channel a partition consumes on (qos, consume, ack), and aio-pika's around it
    (close callbacks, close). Deliveries are pushed while fewer than the prefetch are unacked,
    each to the consumer callback in a task of its own, in queue order, as aiormq does."""

    _tags = itertools.count(1)

    def __init__(self, queue: FakeQueue) -> None:
        self.queue = queue
        self.prefetch = 0
        self.receive: Receive | None = None
        self.acked: list[int] = []
        self.unacked: dict[int, Queued] = {}
        self.most_unacked = 0
        self.close_callbacks: set[Callable[..., None]] = set()
        self.is_closed = False
        self._callbacks: set[asyncio.Task[None]] = set()

    async def get_underlay_channel(self) -> FakeChannel:
        return self

    async def basic_qos(self, prefetch_count: int) -> None:
        self.prefetch = prefetch_count

    async def basic_consume(self, queue: str, callback: Receive) -> None:
        self.receive = callback
        self.queue.channel = self
        self.pump()

    async def basic_ack(self, tag: int, wait: bool = False) -> None:
        if self.is_closed:
            raise RuntimeError("channel closed")  # aiormq: ChannelInvalidStateError
        queued = self.unacked.pop(tag)
        self.acked.append(tag)
        self.queue.acked.append(queued.message_id)
        self.queue.changed.notify()
        self.pump()

    def pump(self) -> None:
        while (
            not self.is_closed
            and self.receive is not None
            and self.queue.ready
            and len(self.unacked) < self.prefetch
        ):
            queued = self.queue.ready.popleft()
            tag = next(self._tags)
            self.unacked[tag] = queued
            self.most_unacked = max(self.most_unacked, len(self.unacked))
            if queued.kind:
                message = marker_message(tag, queued.kind, queued.change, queued.buckets)
            else:
                message = delivered_message(
                    tag,
                    queued.message_id,
                    key=queued.key,
                    body=queued.body,
                    headers=queued.headers,
                    delivery_count=queued.deliveries,
                )
            queued.deliveries += 1
            task = asyncio.ensure_future(self.receive(message))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
        self.queue.changed.notify()

    def cut(self) -> None:
        """The broker closes the channel: its unacked messages go back to the queue's head, in
        their original order."""
        self.is_closed = True
        self.queue.channel = None
        self.queue.ready.extendleft(self.unacked[tag] for tag in sorted(self.unacked, reverse=True))
        self.unacked.clear()
        for callback in list(self.close_callbacks):
            callback(self, ConnectionError("channel cut"))
        self.queue.changed.notify()

    async def close(self) -> None:
        if not self.is_closed:
            self.cut()


class FakeConnection:
    """An aio-pika connection: each channel consumes the one fake queue."""

    def __init__(self, queue: FakeQueue) -> None:
        self.queue = queue
        self.channels: list[FakeChannel] = []

    async def channel(self, publisher_confirms: bool = True) -> FakeChannel:
        self.channels.append(FakeChannel(self.queue))
        return self.channels[-1]


class FakePublish:
    """A confirm-mode publish: keeps each message with its queue; confirms at once, or for the
    queues in `held` once the test calls `confirm(queue)`."""

    def __init__(self, changed: Changed) -> None:
        self.published: list[tuple[str, aio_pika.Message]] = []
        self.held: set[str] = set()
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self.changed = changed

    async def __call__(self, message: aio_pika.Message, queue: str) -> None:
        self.published.append((queue, message))
        self.changed.notify()
        if any(queue.endswith(held) for held in self.held):
            confirmed = asyncio.get_running_loop().create_future()
            self._waiting.append((queue, confirmed))
            await confirmed

    def to(self, suffix: str) -> list[aio_pika.Message]:
        return [message for queue, message in self.published if queue.endswith(suffix)]

    def waiting(self, suffix: str) -> int:
        return sum(q.endswith(suffix) and not f.done() for q, f in self._waiting)

    def confirm(self, suffix: str) -> None:
        self.held.discard(suffix)
        for queue, confirmed in self._waiting:
            if queue.endswith(suffix) and not confirmed.done():
                confirmed.set_result(None)

    def recorded(self) -> list[tuple[str, str]]:
        """(id, outcome) of every outcome record published."""
        return [
            (r["id"], r["outcome"])
            for m in self.to(".outcomes")
            for r in wire.read_outcomes(m.body)
        ]


class FakeTarget:
    """A handler: answers each id from its script of outcomes (then `otherwise`, OK unless
    given), in the order called; a test may hold an id's deliveries (`hold`) until it lets them
    go (`let_go`)."""

    def __init__(
        self,
        changed: Changed,
        script: dict[str, list[Outcome]] | None = None,
        otherwise: Outcome = OK,
    ) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.otherwise = otherwise
        self.calls: list[tuple[str, int]] = []  # (id, attempt)
        self.delivered: list[str] = []  # ids answered with success
        self.in_flight = 0
        self.most_in_flight = 0
        self._held: dict[str, asyncio.Event] = {}
        self.changed = changed

    def hold(self, message_id: str) -> None:
        self._held[message_id] = asyncio.Event()

    def let_go(self, message_id: str) -> None:
        self._held.pop(message_id).set()

    async def deliver(
        self, body: bytes, message_id: str, attempt: int, replay: str = ""
    ) -> Outcome:
        self.calls.append((message_id, attempt))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.changed.notify()
        try:
            held = self._held.get(message_id)
            if held is not None:
                await held.wait()
            script = self.script.get(message_id)
            outcome = script.pop(0) if script else self.otherwise
        finally:
            self.in_flight -= 1
        if outcome.verdict is Verdict.SUCCESS:
            self.delivered.append(message_id)
        self.changed.notify()
        return outcome

    def called(self, message_id: str) -> int:
        return sum(m == message_id for m, _ in self.calls)


def a_handler(**options: Any) -> tuple[HandlerSettings, Any]:
    """A handler's settings (tiny backoff: retries within milliseconds) and the repeats'."""
    billing = {"name": "billing", "events": ["envoice.#"], "url": "http://127.0.0.1:9/",
               "backoff_initial_ms": 1, "backoff_max_ms": 5, **options}  # fmt: skip
    settings = config_from_dict(settings_dict("fast", handlers=[billing]))
    return settings.handlers[0], settings.repeats


def caught_up(partition: Partition) -> None:
    """The partition's read of the outcome log is done (there is no stream here)."""
    read = asyncio.get_running_loop().create_future()
    read.set_result(None)
    partition._caught_up = read


@dataclass(eq=False)
class Rig:
    """One handler's deliveries and one partition of it, consuming a fake queue."""

    changed: Changed
    queue: FakeQueue
    connection: FakeConnection
    publish: FakePublish
    target: FakeTarget
    scheduler: HandlerScheduler
    partition: Partition
    over: asyncio.Event
    consuming: asyncio.Future[None] | None = None

    @property
    def channel(self) -> FakeChannel:
        return self.connection.channels[-1]

    async def consume(self) -> None:
        """Start consuming on a new channel (its outcome log read to the end)."""
        caught_up(self.partition)
        self.consuming = asyncio.ensure_future(
            self.partition.consume(cast(Any, self.connection), self.over)
        )
        await self.changed.until(lambda: self.queue.channel is not None)

    async def cut(self) -> None:
        """The broker closes the channel; the partition forgets its window."""
        assert self.consuming is not None
        self.channel.cut()
        with contextlib.suppress(ConnectionError):
            await self.consuming
        self.consuming = None

    async def until(self, predicate: Callable[[], bool]) -> None:
        await self.changed.until(predicate)

    async def stop(self) -> None:
        """Stop, and close the channel at once (no wait for late acks to settle)."""
        self.scheduler.halt()
        self.over.set()
        if self.consuming is not None:
            self.channel.cut()
            await self.consuming
        await self.scheduler.stop()


async def a_rig(script: dict[str, list[Outcome]] | None = None, **options: Any) -> Rig:
    """A rig consuming its queue, its handler's deliveries started."""
    handler, repeats = a_handler(**options)
    changed = Changed()
    queue = FakeQueue(changed)
    target = FakeTarget(changed, script)
    deliveries = HandlerScheduler(handler, target, repeats)
    partition = Partition(handler, 0, deliveries)
    deliveries.partitions.append(partition)
    publish = FakePublish(changed)
    deliveries.start(publish)
    rig = Rig(changed, queue, FakeConnection(queue), publish, target, deliveries, partition,
              asyncio.Event())  # fmt: skip
    await rig.consume()
    return rig
