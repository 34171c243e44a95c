"""`relay status`: per handler, its partitions' depth, consumers and state, and dead letters.

It only reads: queue figures come from the management API (ready and unacknowledged messages,
every consumer including standbys; sampled by the broker every 5 seconds, so a queue a few
seconds old shows zeros), states from the relay.state stream.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from relay import topology, wire
from relay.broker import connect
from relay.ops.management import Management
from relay.settings import Settings

STATES = ("parked", "retrying", "live", "unknown")  # worst first


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


@dataclass(frozen=True, slots=True)
class HandlerStatus:
    name: str
    partitions: list[PartitionStatus]
    dead_letters: int
    state: str = field(init=False)

    def __post_init__(self) -> None:
        states = {p.state for p in self.partitions}
        worst = next((s for s in STATES if s in states), "unknown")
        object.__setattr__(self, "state", worst)


@dataclass(frozen=True, slots=True)
class Status:
    handlers: list[HandlerStatus]
    unrouted: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "handlers": [
                {**asdict(h), "partitions": [{**asdict(p), "depth": p.depth} for p in h.partitions]}
                for h in self.handlers
            ],
            "unrouted": self.unrouted,
        }

    def render(self) -> str:
        head = f"{'':<24} {'state':<9} {'ready':>7} {'unacked':>7} {'consumers':>9} {'dead':>6}"
        lines = [head]
        for h in self.handlers:
            ready = sum(p.ready for p in h.partitions)
            unacked = sum(p.unacked for p in h.partitions)
            consumers = sum(p.consumers for p in h.partitions)
            lines.append(f"{h.name:<24} {h.state:<9} {ready:>7} {unacked:>7} {consumers:>9} "
                         f"{h.dead_letters:>6}")  # fmt: skip
            for p in h.partitions:
                note = "" if p.in_config else "  (not in the config: older layout)"
                if p.detail and p.state != "live":
                    note += f"  {p.detail}"
                lines.append(f"  {p.queue:<22} {p.state:<9} {p.ready:>7} {p.unacked:>7} "
                             f"{p.consumers:>9}{note}")  # fmt: skip
        lines.append(f"relay.unrouted: {self.unrouted} message(s)")
        return "\n".join(lines)


async def status(settings: Settings) -> Status:
    async with Management(settings.broker) as api:
        queues = {q["name"]: q for q in await api.queues() if q["name"].startswith("relay.")}
    states = await _states(settings) if topology.STATE_STREAM in queues else {}
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
                )
            )
        dead = _figures(handler.dead_letter_queue, queues.get(handler.dead_letter_queue))
        handlers.append(HandlerStatus(handler.name, partitions, dead["ready"] + dead["unacked"]))
    unrouted = _figures(topology.UNROUTED, queues.get(topology.UNROUTED))
    return Status(handlers, unrouted["ready"] + unrouted["unacked"])


def _figures(name: str, queue: dict[str, Any] | None) -> dict[str, Any]:
    queue = queue or {}
    return {
        "queue": name,
        "ready": int(queue.get("messages_ready") or 0),
        "unacked": int(queue.get("messages_unacknowledged") or 0),
        "consumers": int(queue.get("consumers") or 0),
    }


async def _states(settings: Settings) -> dict[str, dict[str, Any]]:
    connection = await connect(settings.broker)
    async with connection:
        return await latest_states(await connection.channel())


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
