"""`relay status`: per handler, its partitions' depth, consumers and state, and dead letters;
and which of relay.unrouted's messages a configured handler binds (stranded there).

It only reads: queue figures come from the management API (ready and unacknowledged messages,
every consumer including standbys; sampled by the broker every 5 seconds, so a queue a few
seconds old shows zeros), states from the relay.state stream. relay.unrouted is read through a
consumer that acks nothing and gives back what it held, in order, by closing its channel (see
`stranded_in_unrouted`); not with basic.get, which puts what it requeues at the back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import ChannelNotFoundEntity

from relay import topology, wire
from relay.broker import connect
from relay.ops.management import Management
from relay.settings import HandlerSettings, Settings

STATES = ("parked", "retrying", "live", "unknown")  # worst first
UNROUTED_READ_MAX = 2000  # messages of relay.unrouted read at most, from its head
UNROUTED_READ_SECONDS = 5.0  # reading relay.unrouted stops by then, whatever it got
RUNBOOK = 'deploy/RUNBOOK.md, "Unrouted growing"'


@dataclass(frozen=True, slots=True)
class QueueStatus:
    queue: str
    ready: int  # waiting for a consumer
    unacked: int  # delivered to a worker, outcome not final yet
    consumers: int  # the active one and standbys

    @property
    def depth(self) -> int:
        return self.ready + self.unacked


@dataclass(frozen=True, slots=True)
class PartitionStatus(QueueStatus):
    state: str = "unknown"  # live | retrying | parked | unknown (no record yet)
    detail: str = ""
    in_config: bool = True  # False: a partition of an older layout, still holding messages
    rate: float | None = None  # its worker's handler rate, last recorded (None: no limit)
    since: str = ""  # when it entered its state: the state record's time (ISO 8601, UTC)
    acked_per_second: float = 0.0  # final outcomes (delivered or dead-lettered), as sampled


@dataclass(frozen=True, slots=True)
class HandlerStatus:
    name: str
    partitions: list[PartitionStatus]
    dead_letters: int
    dead_lettered_per_second: float = 0.0  # as sampled: the dead-letter queue's publish rate
    state: str = field(init=False)
    # Deliveries per second across the cluster: each partition's worker applies its recorded
    # rate to its share, 1/partitions (relay/worker/rate.py); None: a partition has no limit
    rate: float | None = field(init=False)

    @property
    def delivered_per_second(self) -> float:
        """Final outcomes per second that were deliveries: acks less dead letters."""
        acked = sum(p.acked_per_second for p in self.partitions)
        return max(0.0, acked - self.dead_lettered_per_second)

    @property
    def since(self) -> str:
        """When the earliest of its partitions in its state entered it ("" if unknown)."""
        return min((p.since for p in self.partitions if p.state == self.state and p.since),
                   default="")  # fmt: skip

    def __post_init__(self) -> None:
        states = {p.state for p in self.partitions}
        worst = next((s for s in STATES if s in states), "unknown")
        object.__setattr__(self, "state", worst)
        ours = [p.rate for p in self.partitions if p.in_config]
        rate = None if None in ours or not ours else sum(ours) / len(ours)  # type: ignore[arg-type]
        object.__setattr__(self, "rate", rate)


@dataclass(frozen=True, slots=True)
class Stranded:
    """What relay.unrouted holds that handlers in the config bind: webhooks accepted while a
    handler's bindings did not exist, which nothing will deliver by itself."""

    queued: int | None = None  # relay.unrouted's ready messages when read (None: not read)
    read: int = 0  # messages read from its head
    complete: bool = True  # those were all it held (else the first `read` of more)
    handlers: dict[str, int] = field(default_factory=dict)  # of those, bound by each handler
    not_read: str = ""  # why relay.unrouted was not read, if it was not

    def render(self) -> list[str]:
        if self.not_read:
            return [f"  Not read for events that handlers bind: {self.not_read}"]
        if not self.handlers:
            return []
        scope = "" if self.complete else f" among the first {self.read} read"
        lines = [f"  WARNING: events that handlers in the config bind, stranded here{scope}:"]
        for name, count in self.handlers.items():
            lines.append(f"    {name:<22} {'' if self.complete else 'at least '}{count}")
        lines.append(
            "  Accepted before their handler's bindings existed: nothing delivers them by itself."
        )
        lines.append(f"  What to do, and what it does to their order: {RUNBOOK}.")
        return lines


@dataclass(frozen=True, slots=True)
class Status:
    handlers: list[HandlerStatus]
    unrouted: int
    stranded: Stranded = field(default_factory=Stranded)

    def as_dict(self) -> dict[str, Any]:
        return {
            "handlers": [
                {**asdict(h), "partitions": [{**asdict(p), "depth": p.depth} for p in h.partitions]}
                for h in self.handlers
            ],
            "unrouted": self.unrouted,
            "stranded": asdict(self.stranded),
        }

    def render(self) -> str:
        head = (f"{'':<24} {'state':<9} {'ready':>7} {'unacked':>7} {'consumers':>9} {'dead':>6}"
                f" {'rate/s':>7}")  # fmt: skip
        lines = [head]
        for h in self.handlers:
            ready = sum(p.ready for p in h.partitions)
            unacked = sum(p.unacked for p in h.partitions)
            consumers = sum(p.consumers for p in h.partitions)
            rate = "-" if h.rate is None else f"{h.rate:.1f}"
            lines.append(f"{h.name:<24} {h.state:<9} {ready:>7} {unacked:>7} {consumers:>9} "
                         f"{h.dead_letters:>6} {rate:>7}")  # fmt: skip
            for p in h.partitions:
                note = "" if p.in_config else "  (not in the config: older layout)"
                if p.detail and p.state != "live":
                    note += f"  {p.detail}"
                lines.append(f"  {p.queue:<22} {p.state:<9} {p.ready:>7} {p.unacked:>7} "
                             f"{p.consumers:>9}{note}")  # fmt: skip
        lines.append(f"relay.unrouted: {self.unrouted} message(s)")
        lines += self.stranded.render()
        return "\n".join(lines)


async def status(settings: Settings, *, read_unrouted: bool = True) -> Status:
    """What `relay status` shows; with `unrouted` False, relay.unrouted is not read for the
    events handlers bind (a poll every few seconds, `relay console`'s, would hold its head)."""
    async with Management(settings.broker) as api:
        queues = {q["name"]: q for q in await api.queues() if q["name"].startswith("relay.")}
    states: dict[str, dict[str, Any]] = {}
    stranded = Stranded()
    if topology.STATE_STREAM in queues or topology.UNROUTED in queues:
        connection = await connect(settings.broker)
        async with connection:
            if topology.STATE_STREAM in queues:
                states = await latest_states(await connection.channel())
            if read_unrouted and topology.UNROUTED in queues:
                stranded = await stranded_in_unrouted(connection, settings)
    handlers = []
    for handler in settings.handlers:
        pattern = re.compile(rf"^{re.escape(handler.exchange)}\.(\d+)$")
        indexes = sorted(
            {int(m.group(1)) for name in queues if (m := pattern.match(name))}
            | set(range(handler.partitions))
        )
        partitions = []
        for i in indexes:
            name = handler.queue(i)
            record = states.get(name, {})
            partitions.append(
                PartitionStatus(
                    **_figures(name, queues.get(name)),
                    state=record.get("state", "unknown"),
                    detail=record.get("detail", ""),
                    in_config=i < handler.partitions,
                    rate=record.get("rate", handler.max_rate),
                    since=record.get("at", ""),
                    acked_per_second=_rate(queues.get(name), "ack"),
                )
            )
        dlq = queues.get(handler.dead_letter_queue)
        dead = _figures(handler.dead_letter_queue, dlq)
        handlers.append(
            HandlerStatus(
                handler.name, partitions, dead["ready"] + dead["unacked"],
                dead_lettered_per_second=_rate(dlq, "publish"),
            )
        )  # fmt: skip
    unrouted = _figures(topology.UNROUTED, queues.get(topology.UNROUTED))
    sampled = unrouted["ready"] + unrouted["unacked"]  # up to 5 s old: the read's, if any
    return Status(handlers, sampled if stranded.queued is None else stranded.queued, stranded)


def _figures(name: str, queue: dict[str, Any] | None) -> dict[str, Any]:
    queue = queue or {}
    return {
        "queue": name,
        "ready": int(queue.get("messages_ready") or 0),
        "unacked": int(queue.get("messages_unacknowledged") or 0),
        "consumers": int(queue.get("consumers") or 0),
    }


def _rate(queue: dict[str, Any] | None, stat: str) -> float:
    """Messages per second of `stat` (ack, publish) in the broker's last sample (0 if none)."""
    details = ((queue or {}).get("message_stats") or {}).get(f"{stat}_details") or {}
    return float(details.get("rate") or 0.0)


async def latest_states(
    channel: AbstractChannel, idle_seconds: float = 0.5
) -> dict[str, dict[str, Any]]:
    """The latest state record per partition: the relay.state stream read from its start until
    it goes idle (a stream, not a queue: reading consumes nothing)."""
    found: dict[str, dict[str, Any]] = {}
    arrived = asyncio.Event()

    async def on_record(incoming: AbstractIncomingMessage) -> None:
        entry = wire.read_record(incoming.body)
        if entry is not None and entry["kind"] == "state":
            before = found.get(entry["partition"], {})
            if before.get("state") == entry["state"]:  # a step of its rate: in it since before
                entry = {**entry, "at": before.get("at")}
            found[entry["partition"]] = entry
        arrived.set()
        await incoming.ack()

    await channel.set_qos(prefetch_count=500)  # a stream consumer needs a prefetch
    queue = await channel.get_queue(topology.STATE_STREAM, ensure=False)
    tag = await queue.consume(on_record, arguments={"x-stream-offset": "first"})
    while True:
        arrived.clear()
        try:
            await asyncio.wait_for(arrived.wait(), idle_seconds)
        except TimeoutError:
            break
    await queue.cancel(tag)
    return found


async def stranded_in_unrouted(connection: AbstractConnection, settings: Settings) -> Stranded:
    """Count, per handler, the messages at the head of relay.unrouted (up to UNROUTED_READ_MAX)
    whose routing key one of its bindings matches, leaving relay.unrouted as it was.

    A consumer with a prefetch, which acks nothing, reads them; closing its channel gives them
    back in their order to the queue's list of returned messages, delivered before the messages
    never delivered (docs/RABBITMQ.md, "Ordering"). That list also keeps what earlier readers
    gave back and this one did not take: a reader holding fewer than that list puts its own
    behind the rest, and the queue is reordered (tests/test_status.py shows it). So every read
    holds the same bound, or the whole queue when it is shorter, never less; and none while
    another consumer takes from the queue (a shovel moving it), which would get later messages
    before those held here.
    """
    channel = await connection.channel()
    try:
        try:
            queue = await channel.declare_queue(topology.UNROUTED, passive=True)
        except ChannelNotFoundEntity:  # deleted since the management API listed it
            return Stranded(queued=0)
        ready = queue.declaration_result.message_count or 0
        consumers = queue.declaration_result.consumer_count or 0
        if consumers:
            why = f"{topology.UNROUTED} has {consumers} consumer(s) (a shovel moving it?)"
            return Stranded(complete=False, not_read=why)
        keys = await _routing_keys(channel, queue, min(ready, UNROUTED_READ_MAX))
    finally:
        await channel.close()  # what it held goes back, in order
    await _given_back(connection, len(keys))
    handlers = bound_by(settings.handlers, keys)
    return Stranded(queued=ready, read=len(keys), complete=len(keys) == ready, handlers=handlers)


async def _given_back(connection: AbstractConnection, count: int) -> None:
    """Wait (up to UNROUTED_READ_SECONDS) until relay.unrouted counts `count` messages ready:
    what a closed channel held takes milliseconds to go back, and a reader meanwhile would find
    the queue without them."""
    if not count:
        return
    channel = await connection.channel()
    deadline = asyncio.get_running_loop().time() + UNROUTED_READ_SECONDS
    try:
        while asyncio.get_running_loop().time() < deadline:
            queue = await channel.declare_queue(topology.UNROUTED, passive=True)
            if (queue.declaration_result.message_count or 0) >= count:
                return
            await asyncio.sleep(0.01)
    except ChannelNotFoundEntity:  # deleted meanwhile: nothing to wait for
        pass
    finally:
        await channel.close()


def bound_by(handlers: Iterable[HandlerSettings], routing_keys: Iterable[str]) -> dict[str, int]:
    """Per handler (in config order, those with any), how many of `routing_keys` its bindings
    match: a key several handlers bind counts for each."""
    keys = Counter(routing_keys)
    counts = {
        handler.name: sum(
            n
            for key, n in keys.items()
            if any(wire.topic_matches(b, key) for b in handler.bindings)
        )
        for handler in handlers
    }
    return {name: count for name, count in counts.items() if count}


async def _routing_keys(channel: AbstractChannel, queue: AbstractQueue, wanted: int) -> list[str]:
    """The routing keys of the first `wanted` messages of `queue`, in queue order (fewer if not
    all arrive within UNROUTED_READ_SECONDS), held unacked until the channel closes."""
    held: dict[int, str] = {}  # by delivery tag: deliveries are numbered in queue order
    arrived = asyncio.Event()

    async def on_message(incoming: AbstractIncomingMessage) -> None:
        assert incoming.delivery_tag is not None
        held[incoming.delivery_tag] = incoming.routing_key or ""
        if len(held) >= wanted:
            arrived.set()

    if wanted:
        await channel.set_qos(prefetch_count=wanted)
        await queue.consume(on_message, no_ack=False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), UNROUTED_READ_SECONDS)
    return [held[tag] for tag in sorted(held)]
