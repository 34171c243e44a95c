"""`relay topology declare` brings the broker to the config's topology and says every change;
`relay topology export` gives it as definitions JSON.

What the config describes (relay/topology.py) is compared with what the broker has (read from
the management API): what is missing is declared, and the bindings relay owns that the config
no longer has are removed, new bindings first, so that no message finds no route in between.
relay owns the main exchange's bindings to `relay.*` exchanges (the handlers' patterns) and a
handler exchange's bindings to its own queues. Queues are never deleted while they hold
messages: they are reported, and `--prune` removes them once they are empty. A queue of an
older relay with another type (a classic dead-letter queue) is converted, its messages moved in
order, while no worker consumes the handler's partitions. A stream (the archive, an outcome log)
is never declared again once it exists: the broker refuses other arguments, so a stream whose
retention differs from the config's is reported with the policy that applies the config's.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import ChannelPreconditionFailed

from relay import replays, topology, wire
from relay.broker import connect, wait_for_turn
from relay.errors import RelayError
from relay.ops.management import Management
from relay.settings import HandlerSettings, Settings
from relay.topology import Binding, Topology

log = structlog.get_logger()

LEGACY_HEADER = re.compile(r"^relay-p\d+$")  # partition headers of relay before buckets
# Between removing a bucket's old binding and putting FENCE into its old partition: a message
# the broker routed just before the removal may still be on its way to that queue.
ROUTING_SETTLE_SECONDS = 1.0
TURN_SECONDS = 120.0  # how long a run waits for another to finish


@dataclass(frozen=True, slots=True)
class QueueState:
    """A queue as the broker has it (a leftover: one relay declared once that the config no
    longer uses)."""

    name: str
    messages: int  # ready and unacknowledged
    consumers: int
    type: str = "classic"  # classic, quorum, stream
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BrokerState:
    """What the broker has, as far as relay is concerned."""

    exchanges: dict[str, str]  # name -> type
    queues: dict[str, QueueState]
    bindings: list[Binding]


@dataclass(frozen=True, slots=True)
class Move:
    """A handler's buckets that leave their partition for another: a partition change."""

    handler: str
    change: str  # an id, in the markers and release records
    gains: dict[str, list[int]]  # queue -> the buckets it gains
    losses: dict[str, list[int]]  # queue -> the buckets it loses
    partitions: int  # partition queues that may hold messages after it: 0 .. partitions - 1


@dataclass(frozen=True, slots=True)
class Conversion:
    """A queue of an older relay, of another type than the config's, to convert."""

    queue: str
    type: str  # what it becomes
    partitions: tuple[str, ...]  # the handler's: it waits until they have no consumer
    busy: int  # consumers on them (the management API's figure, until checked on the channel)
    old: bool  # the queue of the other type is still there (else: interrupted after its delete)


CONVERTING = ".converting"  # suffix of the queue that holds the messages while it converts

# A stream's retention arguments, and the policy keys that override them (a policy's max-age
# wins over the argument, longer or shorter: docs/RABBITMQ.md, "Streams").
RETENTION = {
    "x-max-age": "max-age",
    "x-max-length-bytes": "max-length-bytes",
    "x-stream-max-segment-size-bytes": "stream-max-segment-size-bytes",
}


@dataclass(frozen=True, slots=True)
class Retention:
    """A stream the broker has with other retention arguments than the config says."""

    queue: str
    have: dict[str, str]
    want: dict[str, str]


@dataclass(frozen=True, slots=True)
class Plan:
    declare: Topology = field(default_factory=Topology)  # what is missing
    unbind: list[Binding] = field(default_factory=list)  # owned bindings the config lacks
    legacy: list[Binding] = field(default_factory=list)  # relay-p<N> bindings: --prune removes
    leftovers: list[QueueState] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    convert: list[Conversion] = field(default_factory=list)
    retention: list[Retention] = field(default_factory=list)  # streams kept as they are
    unused_archive: QueueState | None = None  # the archive is off in the config, on the broker not
    archive_bound: bool = False  # ... and still bound to the main exchange

    @property
    def empty(self) -> bool:
        return not (
            self.declare.exchanges
            or self.declare.queues
            or self.declare.bindings
            or self.unbind
            or self.convert
        )


def plan(
    desired: Topology, broker: BrokerState, main_exchange: str, change: str = "change"
) -> Plan:
    """The changes that take `broker` to `desired` (pure: no I/O).

    Only this config's objects are considered: its main exchange, and the handler exchanges the
    config describes or the main exchange is bound to (a removed handler's among them); the
    broker may hold other deployments' objects beside them."""
    handlers = {e.name for e in desired.exchanges if e.type == "headers"} | {
        b.destination for b in broker.bindings if _to_handler(b, main_exchange)
    }

    def owned(b: Binding) -> bool:
        return _to_handler(b, main_exchange) or (
            b.source in handlers
            and b.destination_type == "queue"
            and b.destination.startswith(b.source + ".")
        )

    have = {_key(b) for b in broker.bindings}
    want = {_key(b) for b in desired.bindings}
    stale = [b for b in broker.bindings if owned(b) and _key(b) not in want]
    legacy = [b for b in stale if any(LEGACY_HEADER.match(k) for k in b.arguments)]
    wanted_queues = {q.name for q in desired.queues}
    leftovers = [
        queue
        for name, queue in sorted(broker.queues.items())
        if name not in wanted_queues and name.rsplit(".", 1)[0] in handlers
    ]
    convert = _conversions(desired, broker)
    converting = {c.queue for c in convert}
    unused_archive = (
        None if topology.ARCHIVE in wanted_queues else broker.queues.get(topology.ARCHIVE)
    )
    return Plan(
        declare=Topology(
            [e for e in desired.exchanges if e.name not in broker.exchanges],
            [q for q in desired.queues if q.name not in broker.queues.keys() | converting],
            [b for b in desired.bindings if _key(b) not in have],
        ),
        unbind=[b for b in stale if b not in legacy],
        legacy=legacy,
        leftovers=leftovers,
        moves=_moves(desired, broker, change),
        convert=convert,
        retention=_retention_changes(desired, broker),
        unused_archive=unused_archive,
        archive_bound=any(
            b.source == main_exchange and b.destination == topology.ARCHIVE for b in broker.bindings
        ),
    )


def _retention_changes(desired: Topology, broker: BrokerState) -> list[Retention]:
    """The config's streams that the broker has with other retention arguments."""
    changes = []
    for queue in desired.queues:
        found = broker.queues.get(queue.name)
        if not topology.is_stream(queue) or found is None:
            continue
        have, want = _retention(found.arguments), _retention(queue.arguments)
        if have != want:
            changes.append(Retention(queue.name, have, want))
    return changes


def _retention(arguments: dict[str, Any]) -> dict[str, str]:
    return {k: str(arguments[k]) for k in RETENTION if k in arguments}


def _conversions(desired: Topology, broker: BrokerState) -> list[Conversion]:
    """The config's dead-letter queues that the broker has with another type (classic, from an
    older relay), or whose conversion was interrupted (its CONVERTING queue is left)."""
    conversions = []
    for queue in desired.queues:
        if not queue.name.endswith(".dlq"):
            continue
        want = str(queue.arguments.get("x-queue-type", "classic"))
        have = broker.queues.get(queue.name)
        left = broker.queues.get(queue.name + CONVERTING)
        if (have is None or have.type == want) and left is None:
            continue
        handler = queue.name.rsplit(".", 1)[0]
        partitions = tuple(
            name
            for name in broker.queues
            if name.rsplit(".", 1)[0] == handler and name.rsplit(".", 1)[1].isdigit()
        )
        busy = sum(broker.queues[name].consumers for name in partitions)
        old = have is not None and have.type != want
        conversions.append(Conversion(queue.name, want, partitions, busy, old))
    return conversions


def _moves(desired: Topology, broker: BrokerState, change: str) -> list[Move]:
    """Per handler, the buckets whose partition changes (a bucket bound nowhere yet moves not)."""
    moves = []
    for exchange in sorted({e.name for e in desired.exchanges if e.type == "headers"}):
        old = _bucket_routes(broker.bindings, exchange)
        new = _bucket_routes(desired.bindings, exchange)
        moved = [b for b in sorted(new) if b in old and old[b] != new[b]]
        if not moved:
            continue
        gains: dict[str, list[int]] = defaultdict(list)
        losses: dict[str, list[int]] = defaultdict(list)
        for bucket in moved:
            gains[new[bucket]].append(bucket)
            losses[old[bucket]].append(bucket)
        count = 1 + max(int(q.rsplit(".", 1)[1]) for q in [*old.values(), *new.values()])
        moves.append(
            Move(exchange.removeprefix("relay."), change, dict(gains), dict(losses), count)
        )
    return moves


def _bucket_routes(bindings: Iterable[Binding], exchange: str) -> dict[int, str]:
    return {
        int(b.arguments[wire.BUCKET_HEADER]): b.destination
        for b in bindings
        if b.source == exchange and wire.BUCKET_HEADER in b.arguments
    }


def _to_handler(binding: Binding, main_exchange: str) -> bool:
    """A binding of the main exchange to a handler's exchange (by one of its patterns)."""
    return (
        binding.source == main_exchange
        and binding.destination_type == "exchange"
        and binding.destination.startswith("relay.")
    )


def _key(b: Binding) -> tuple[str, str, str, str, tuple[tuple[str, str], ...]]:
    arguments = tuple(sorted((k, str(v)) for k, v in b.arguments.items()))
    return b.source, b.destination, b.destination_type, b.routing_key, arguments


# --- describing a plan ------------------------------------------------------------------------


def plan_lines(plan: Plan, *, prune: bool, vhost: str = "/") -> list[str]:
    """One line per change, bucket bindings grouped per queue."""
    lines = [f"+ exchange {e.name} ({e.type})" for e in plan.declare.exchanges]
    lines += [f"+ queue {q.name}" for q in plan.declare.queues]
    lines += _binding_lines("+", plan.declare.bindings)
    lines += _binding_lines("-", plan.unbind)
    for c in plan.convert:
        if c.busy:
            lines.append(
                f"= queue {c.queue} stays as it is until it can become a {c.type} queue: stop "
                f"the workers of its handler ({c.busy} consumer(s) on its partitions), then run "
                "`relay topology declare` again"
            )
        else:
            lines.append(f"~ queue {c.queue} becomes a {c.type} queue, its messages moved in order")
    for move in plan.moves:
        moved = sum(len(buckets) for buckets in move.gains.values())
        lines.append(
            f"~ {moved} bucket(s) of relay.{move.handler} change partition: each new partition "
            "holds them until the old one has delivered what it has of them"
        )
    if plan.legacy:
        what = f"{len(plan.legacy)} legacy relay-p<N> binding(s)"
        if prune:
            lines.append(f"- {what}")
        else:
            lines.append(f"= {what} kept for ingresses older than buckets: --prune removes them")
    lines += [_retention_line(r, vhost) for r in plan.retention]
    if plan.unused_archive is not None:
        lines.append(_unused_archive_line(plan.unused_archive, plan.archive_bound, vhost))
    for queue in plan.leftovers:
        if queue.type == "stream":  # its count lags (sampled): never deleted on it
            lines.append(
                f"= stream {queue.name} is no longer used: kept, its retention expires what it "
                f"holds (`rabbitmqctl delete_queue -p {vhost} {queue.name}` removes it now)"
            )
        elif queue.messages == 0 and prune:
            lines.append(f"- queue {queue.name} (empty)")
        else:
            lines.append(
                f"= queue {queue.name} is no longer used: {queue.messages} message(s), "
                f"{queue.consumers} consumer(s); `relay topology declare --prune` removes it "
                "once empty"
            )
    return lines


def _retention_line(change: Retention, vhost: str) -> str:
    def shown(arguments: dict[str, str]) -> str:
        return ", ".join(f"{k} {v}" for k, v in arguments.items()) or "none"

    policy = {
        RETENTION[k]: int(v) if v.isdigit() else v
        for k, v in change.want.items()
        if change.have.get(k) != v
    }
    line = (
        f"= stream {change.queue} keeps its retention ({shown(change.have)}; the config says "
        f"{shown(change.want)}): the broker refuses to change a stream's arguments"
    )
    if policy:
        name = change.queue.replace(".", "-")
        pattern = "^" + re.escape(change.queue) + "$"
        line += (
            f". A policy overrides them: rabbitmqctl set_policy -p {vhost} {name} '{pattern}' "
            f"'{json.dumps(policy, separators=(',', ':'))}' --apply-to queues"
        )
    dropped = [k for k in change.have if k not in change.want]
    if dropped:
        line += f" ({', '.join(dropped)} stays: a policy can set another value, not remove it)"
    return line


def _unused_archive_line(archive: QueueState, bound: bool, vhost: str) -> str:
    line = f"= stream {archive.name} is kept though the config turns the archive off"
    if bound:
        line += (
            ": it is still bound to the exchange, so it goes on receiving every webhook and "
            "relay.unrouted stays empty"
        )
    return (
        f"{line}; `rabbitmqctl delete_queue -p {vhost} {archive.name}` removes it, with every "
        "message it holds"
    )


def _binding_lines(sign: str, bindings: Iterable[Binding]) -> list[str]:
    buckets: dict[tuple[str, str], list[int]] = defaultdict(list)
    lines = []
    for b in bindings:
        bucket = b.arguments.get(wire.BUCKET_HEADER)
        if bucket is not None:
            buckets[(b.source, b.destination)].append(int(bucket))
        elif b.destination_type == "exchange":
            lines.append(f"{sign} bind {b.source} -> {b.destination} on {b.routing_key!r}")
        else:
            lines.append(f"{sign} bind {b.source} -> {b.destination} {b.arguments}")
    for (source, destination), numbers in sorted(buckets.items()):
        listed = " ".join(str(n) for n in sorted(numbers))
        lines.append(f"{sign} bind {source} -> {destination} buckets {listed}")
    return lines


# --- reading the broker and applying a plan ---------------------------------------------------


async def read(api: Management, desired: Topology, main_exchange: str) -> BrokerState:
    """What the broker has of this config's objects: the exchanges it describes and the handler
    exchanges the main exchange is bound to (a removed handler's among them), their bindings,
    and every `relay.` queue."""
    bindings = [_binding(b) for b in await api.bindings_from(main_exchange)]
    handlers = {b.destination for b in bindings if _to_handler(b, main_exchange)}
    ours = {e.name for e in desired.exchanges} | handlers
    exchanges = {e["name"]: e["type"] for e in await api.exchanges() if e["name"] in ours}
    for name in sorted(exchanges.keys() - {main_exchange}):
        bindings += [_binding(b) for b in await api.bindings_from(name)]
    queues = {
        q["name"]: QueueState(
            q["name"],
            int(q.get("messages_ready") or 0) + int(q.get("messages_unacknowledged") or 0),
            int(q.get("consumers") or 0),
            str(q.get("type") or "classic"),
            dict(q.get("arguments") or {}),
        )
        for q in await api.queues()
        if q["name"].startswith("relay.")
    }
    return BrokerState(exchanges, queues, bindings)


def _binding(raw: dict[str, Any]) -> Binding:
    return Binding(
        raw["source"],
        raw["destination"],
        raw["destination_type"],
        raw["routing_key"],
        dict(raw.get("arguments") or {}),
    )


async def apply(
    channel: AbstractChannel,
    desired: Topology,
    plan: Plan,
    *,
    prune: bool,
    backfills: Iterable[HandlerSettings] = (),
) -> None:
    """Declare what is desired and remove what the plan says. Buckets that change partition
    are moved with markers (relay/worker/changes.py) so that each key stays in order: HOLD into
    the partitions gaining buckets and FENCE_START into those losing them, then the new bindings
    and the removal of the old ones, then (once routing decisions made meanwhile have landed)
    FENCE into those losing them. New handlers with a backfill get its markers (relay/replays.py)
    before their bindings. `channel` must be in confirm mode."""
    converting = {c.queue for c in plan.convert}
    missing = {q.name for q in plan.declare.queues}
    queues = [
        q
        for q in desired.queues
        if q.name not in converting and (q.name in missing or not topology.is_stream(q))
    ]  # a stream that exists is never declared again: it may have other arguments
    await topology.declare(channel, Topology(desired.exchanges, queues))
    for handler in backfills:
        await replays.begin(channel, handler, replays.Replay.backfill(handler))
    for move in plan.moves:
        for queue, buckets in move.gains.items():
            await _publish(channel, wire.marker(wire.HOLD, move.change, buckets), queue)
        for queue, buckets in move.losses.items():
            await _publish(channel, wire.marker(wire.FENCE_START, move.change, buckets), queue)
    await topology.declare(channel, Topology(bindings=desired.bindings))
    for binding in plan.unbind + (plan.legacy if prune else []):
        await topology.unbind(channel, binding)
    if plan.moves:
        await asyncio.sleep(ROUTING_SETTLE_SECONDS)
    for move in plan.moves:
        for queue, buckets in move.losses.items():
            await _publish(channel, wire.marker(wire.FENCE, move.change, buckets), queue)
        record = wire.layout_record(
            handler=move.handler, partitions=move.partitions, change=move.change
        )
        await _publish(channel, record, topology.STATE_STREAM)
    if prune:
        for leftover in plan.leftovers:
            if leftover.messages == 0 and leftover.type != "stream":
                await _delete_if_empty(channel, leftover.name)


async def convert(connection: AbstractConnection, conversion: Conversion) -> None:
    """Recreate a queue with the config's type: its messages go to the CONVERTING queue, the old
    queue is deleted and declared anew, and they come back, in order. Run again after an
    interruption, it picks up where it stopped (the CONVERTING queue holds what was moved).

    The way back is published on a new channel: a channel that published to the old queue
    crashes the connection (INTERNAL_ERROR, RabbitMQ 3.10) when it publishes to the new one."""
    name, holding = conversion.queue, conversion.queue + CONVERTING
    arguments: dict[str, Any] = {"x-queue-type": conversion.type}
    async with connection.channel(on_return_raises=True) as channel:
        await channel.declare_queue(holding, durable=True, arguments=topology.QUORUM)
        if conversion.old:
            await _move(channel, name, holding)
            await _delete_if_empty(channel, name)
        await channel.declare_queue(name, durable=True, arguments=arguments)
    async with connection.channel(on_return_raises=True) as channel:
        await _move(channel, holding, name)
        await _delete_if_empty(channel, holding)


async def _consumers(channel: AbstractChannel, queues: Iterable[str]) -> int:
    total = 0
    for name in queues:
        queue = await channel.declare_queue(name, passive=True)
        total += queue.declaration_result.consumer_count or 0
    return total


async def _delete_if_empty(channel: AbstractChannel, name: str) -> None:
    """Delete a queue that holds nothing and has no consumer. Not with the if-empty flag: a quorum
    queue refuses it and the broker closes the connection (NOT_IMPLEMENTED, RabbitMQ 3.10). Only
    for queues nothing routes to any more, so none can arrive between the check and the delete."""
    queue = await channel.declare_queue(name, passive=True)
    result = queue.declaration_result
    if result.message_count or result.consumer_count:
        raise RelayError(f"{name} was not deleted: it holds messages or has a consumer")
    await channel.queue_delete(name)


async def _move(channel: AbstractChannel, source: str, destination: str) -> None:
    """Move every message, one at a time (each confirmed, then acked), so the order holds."""
    queue = await channel.get_queue(source, ensure=False)
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        await channel.default_exchange.publish(
            wire.moved(message.body, message), destination, mandatory=True
        )
        await message.ack()


async def _publish(channel: AbstractChannel, message: aio_pika.Message, queue: str) -> None:
    await channel.default_exchange.publish(message, queue, mandatory=True)


async def converge(settings: Settings, *, dry_run: bool, prune: bool) -> list[str]:
    """Plan, print-ready, and (unless `dry_run`) apply; the lines describing the changes.

    Runs that apply take turns (`_turn`): two at once (a rollout's init containers) would each
    move the same buckets with markers of their own."""
    desired = topology.describe(settings)
    vhost = settings.broker.vhost
    if dry_run:
        changes = await _plan(settings, desired)
        return plan_lines(changes, prune=prune, vhost=vhost) + _backfill_lines(settings, changes)
    connection = await connect(settings.broker)
    async with connection:
        turn, what = (
            f"relay.declaring.{settings.broker.exchange}",
            "another `relay topology declare`",
        )
        await wait_for_turn(connection, turn, give_up_after=TURN_SECONDS, what=what)
        changes = await _plan(settings, desired)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            # The management API's consumer counts lag by seconds: count them on the channel.
            checked = [
                replace(c, busy=await _consumers(channel, c.partitions)) for c in changes.convert
            ]
            changes = replace(changes, convert=checked)
            backfills = _backfills(settings, changes)
            await apply(channel, desired, changes, prune=prune, backfills=backfills)
            for conversion in changes.convert:
                if not conversion.busy:
                    await convert(connection, conversion)
        except ChannelPreconditionFailed as exc:  # e.g. a queue with other arguments
            raise RelayError(f"the broker refused a change: {exc}") from None
    return plan_lines(changes, prune=prune, vhost=vhost) + _backfill_lines(settings, changes)


def _backfills(settings: Settings, plan: Plan) -> list[HandlerSettings]:
    """The handlers the plan creates that have a backfill."""
    new = {e.name for e in plan.declare.exchanges}
    return [h for h in settings.handlers if h.backfill and h.exchange in new]


def _backfill_lines(settings: Settings, plan: Plan) -> list[str]:
    return [
        f"~ handler {h.name} is new: it first gets the archive's messages of its events from "
        f"{h.backfill} back, then live ones"
        for h in _backfills(settings, plan)
    ]


async def _plan(settings: Settings, desired: Topology) -> Plan:
    async with Management(settings.broker) as api:
        broker = await read(api, desired, settings.broker.exchange)
    return plan(desired, broker, settings.broker.exchange, uuid.uuid4().hex[:12])


def export(settings: Settings) -> dict[str, Any]:
    """Everything relay declares for `settings`, as RabbitMQ definitions JSON (the management
    UI's "Import definitions"), in the vhost of `broker.url`."""
    described = topology.describe(settings)
    vhost = settings.broker.vhost
    return {
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": True,
             "auto_delete": False, "internal": False, "arguments": e.arguments}
            for e in described.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False,
             "arguments": q.arguments}
            for q in described.queues
        ],
        "bindings": [
            {"source": b.source, "vhost": vhost, "destination": b.destination,
             "destination_type": b.destination_type, "routing_key": b.routing_key,
             "arguments": b.arguments}
            for b in described.bindings
        ],
    }  # fmt: skip
