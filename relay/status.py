"""`relay status`: per handler, its partitions' depth, consumers and state, and dead letters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from relay import state, topology
from relay.settings import Settings


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    queue: str
    depth: int
    consumers: int
    state: str  # live | retrying | parked | unknown (no record yet)
    detail: str = ""


@dataclass(frozen=True, slots=True)
class HandlerStatus:
    name: str
    partitions: list[PartitionStatus]
    dead_letters: int
    state: str = field(init=False)

    def __post_init__(self) -> None:
        states = {p.state for p in self.partitions}
        worst = next((s for s in ("parked", "retrying", "live") if s in states), "unknown")
        object.__setattr__(self, "state", worst)


async def _depth(channel: AbstractChannel, name: str) -> tuple[int, int]:
    queue = await channel.declare_queue(name, passive=True)
    result = queue.declaration_result
    return result.message_count or 0, result.consumer_count or 0


async def status(settings: Settings) -> tuple[list[HandlerStatus], int]:
    """Each handler's status, and the depth of relay.unrouted."""
    connection = await aio_pika.connect(settings.broker.url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel, topology.describe(settings))
        states = await state.latest(await connection.channel())
        handlers = []
        for handler in settings.handlers:
            partitions = []
            for queue in handler.queues:
                depth, consumers = await _depth(channel, queue)
                record: dict[str, Any] = states.get(queue, {})
                current = record.get("state", "unknown")
                partitions.append(
                    PartitionStatus(queue, depth, consumers, current, record.get("detail", ""))
                )
            dead, _ = await _depth(channel, handler.dead_letter_queue)
            handlers.append(HandlerStatus(handler.name, partitions, dead))
        unrouted, _ = await _depth(channel, topology.UNROUTED)
    return handlers, unrouted


def as_dict(handlers: list[HandlerStatus], unrouted: int) -> dict[str, Any]:
    return {"handlers": [asdict(h) for h in handlers], "unrouted": unrouted}


def render(handlers: list[HandlerStatus], unrouted: int) -> str:
    lines = [f"{'handler':<20} {'state':<9} {'depth':>7} {'consumers':>9} {'dead':>6}"]
    for h in handlers:
        depth = sum(p.depth for p in h.partitions)
        consumers = sum(p.consumers for p in h.partitions)
        lines.append(f"{h.name:<20} {h.state:<9} {depth:>7} {consumers:>9} {h.dead_letters:>6}")
        for p in h.partitions:
            detail = f"  {p.detail}" if p.detail and p.state != "live" else ""
            lines.append(f"  {p.queue:<18} {p.state:<9} {p.depth:>7} {p.consumers:>9}{detail}")
    lines.append(f"relay.unrouted: {unrouted} message(s)")
    return "\n".join(lines)
