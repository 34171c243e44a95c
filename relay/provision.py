"""What relay's processes create at start, never changing what exists: the ingress and every
worker call `create_missing` before they take traffic."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import replace

import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from relay import replays, topology, wire
from relay.broker import exchange_exists, queue_exists
from relay.settings import HandlerSettings, Settings
from relay.topology import QUORUM, Queue, Topology, outcome_log_queue

log = structlog.get_logger()


async def create_missing(
    connection: AbstractConnection,
    channel: AbstractChannel,
    settings: Settings,
    handlers: Iterable[HandlerSettings],
    *,
    by: str,
) -> list[HandlerSettings]:
    """Create what is missing, never changing what exists: the main exchange, relay.unrouted,
    the archive (bound to the exchange) and relay.state, then the topology of each of
    `handlers` whose exchange does not exist yet (with a layout record, which workers follow);
    an existing handler only gets its dead-letter queue and outcome log if it lacks them. The
    ingress and the workers both do this at start, so a configured handler's webhooks reach its
    partitions before any worker has run. An existing handler is otherwise left as it is: only
    `relay topology declare` changes one, so a process of an older config restarting during a
    rolling change never undoes it.

    A handler's exchange is declared after its queues, and its patterns are bound last: it
    exists only once its partitions do. `channel` must be in confirm mode. Returns the handlers
    whose topology was created."""
    common = topology.ingress(settings) + topology.state()
    await topology.declare(channel, await topology.without_existing_streams(connection, common))
    created = []
    for h in handlers:
        if await exchange_exists(connection, h.exchange):
            # A handler of an older relay may lack them (its classic dead-letter queue is left:
            # `relay topology declare` converts it).
            wanted = [Queue(h.dead_letter_queue, QUORUM), outcome_log_queue(settings.archive, h)]
            missing = [q for q in wanted if not await queue_exists(connection, q.name)]
            if missing:
                await topology.declare(channel, Topology(queues=missing))
            continue
        described = await topology.without_existing_streams(
            connection, topology.handler(settings, h)
        )
        patterns = [b for b in described.bindings if b.destination_type == "exchange"]
        await topology.declare(
            channel, replace(described, bindings=described.bindings[: -len(patterns)])
        )
        if h.backfill:  # its partitions hold what comes until the archive's messages are in
            await replays.begin(channel, h, replays.Replay.backfill(h))
        await topology.declare(channel, Topology(bindings=patterns))
        layout = wire.layout_record(
            handler=h.name, partitions=h.partitions, change=uuid.uuid4().hex[:12]
        )
        await channel.default_exchange.publish(layout, topology.STATE_STREAM, mandatory=True)
        log.info("handler topology declared", handler=h.name, partitions=h.partitions, by=by)
        created.append(h)
    return created
