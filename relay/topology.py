"""The broker objects relay needs, described once: declared by the processes, exported for the
management UI's import, and compared with the broker's by `relay topology declare`.

relay.activities (topic, alternate exchange relay.unrouted)
  --<pattern>--> relay.<handler> (headers)
                   --relay-bucket = b--> relay.<handler>.<b % partitions> (quorum, single active)
  --#--> relay.archive (stream: every accepted webhook; [archive] enabled)
relay.ids (stream: digests of the ids the ingress processes accepted, kept the repeats horizon)
relay.unrouted (fanout) --> relay.unrouted (quorum)
relay.<handler>.dlq (quorum, read by `relay dlq` through a consumer: relay/ops/deadletters.py)
relay.<handler>.outcomes (stream: the handler's final delivery outcomes, written by its workers)
relay.state (stream: handler state records)

Streams are created, never re-declared: the broker refuses a declaration whose arguments differ
from the stream's (PRECONDITION_FAILED), and an operator may have changed retention in the
config. `relay topology declare` reports such a stream instead (relay/ops/topology.py).

The ingress stamps each message with its key's bucket (relay/wire.py); a handler's partitions
are bound to the buckets they own. So the ingress needs no handler list, and a key stays in its
partition across broker restarts (the consistent-hash exchange plugin rebuilds its ring on a
restart and may move keys: rabbitmq-server #3386).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractConnection

from relay import wire
from relay.broker import queue_exists
from relay.settings import ArchiveSettings, HandlerSettings, Settings

UNROUTED = "relay.unrouted"
STATE_STREAM = "relay.state"
ARCHIVE = "relay.archive"  # every accepted webhook, retained (a stream)
ACCEPTED_IDS = "relay.ids"  # what the ingress processes accepted, for repeats (relay/accepted.py)
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
STREAM: dict[str, Any] = {"x-queue-type": "stream", "x-max-age": "7D"}
PARTITION: dict[str, Any] = {**QUORUM, "x-single-active-consumer": True}


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Binding:
    source: str
    destination: str
    destination_type: str  # "queue" | "exchange"
    routing_key: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Topology:
    exchanges: list[Exchange] = field(default_factory=list)
    queues: list[Queue] = field(default_factory=list)
    bindings: list[Binding] = field(default_factory=list)

    def __add__(self, other: Topology) -> Topology:
        return Topology(
            self.exchanges + other.exchanges,
            self.queues + other.queues,
            self.bindings + other.bindings,
        )


def stream(max_age: str, max_bytes: int, segment_bytes: int) -> dict[str, Any]:
    """A retained stream's arguments: retention by age, and by size unless `max_bytes` is 0."""
    arguments: dict[str, Any] = {"x-queue-type": "stream", "x-max-age": max_age}
    if max_bytes:
        arguments["x-max-length-bytes"] = max_bytes
    arguments["x-stream-max-segment-size-bytes"] = segment_bytes
    return arguments


def archive_queue(archive: ArchiveSettings) -> Queue:
    return Queue(ARCHIVE, stream(archive.max_age, archive.max_bytes, archive.segment_bytes))


def outcome_log_queue(archive: ArchiveSettings, handler: HandlerSettings) -> Queue:
    arguments = stream(archive.outcomes_max_age, archive.outcomes_max_bytes, archive.segment_bytes)
    return Queue(handler.outcome_log, arguments)


def accepted_ids_queue(settings: Settings) -> Queue:
    max_age = f"{settings.repeats.horizon_seconds}s"
    return Queue(ACCEPTED_IDS, stream(max_age, 0, settings.archive.segment_bytes))


def ingress(settings: Settings) -> Topology:
    """What the ingress publishes into: the exchange, relay.unrouted behind it, the archive
    bound to it for every routing key (when enabled), and relay.ids."""
    exchange = settings.broker.exchange
    described = Topology(
        [
            Exchange(exchange, "topic", {"alternate-exchange": UNROUTED}),
            Exchange(UNROUTED, "fanout"),
        ],
        [Queue(UNROUTED, QUORUM), accepted_ids_queue(settings)],
        [Binding(UNROUTED, UNROUTED, "queue", "")],
    )
    if settings.archive.enabled:
        described += Topology(
            queues=[archive_queue(settings.archive)],
            bindings=[Binding(exchange, ARCHIVE, "queue", "#")],
        )
    return described


def state() -> Topology:
    return Topology(queues=[Queue(STATE_STREAM, STREAM)])


def bucket_binding(handler: HandlerSettings, bucket: int, partitions: int) -> Binding:
    """The binding that routes `bucket` to its partition among `partitions`."""
    queue = handler.queue(wire.partition(bucket, partitions))
    match = {"x-match": "all", wire.BUCKET_HEADER: str(bucket)}
    return Binding(handler.exchange, queue, "queue", "", match)


def handler(settings: Settings, handler: HandlerSettings) -> Topology:
    """A handler's exchange, bound to the main exchange by its patterns; its partitions, each
    bound to the buckets it owns; its dead-letter queue and outcome log. The bindings are listed
    bottom-up (every bucket's, then the patterns): declared in this order, a webhook that matches
    a pattern always finds its partition, so a declaration never refuses traffic."""
    return Topology(
        [Exchange(handler.exchange, "headers")],
        [Queue(q, PARTITION) for q in handler.queues]
        + [Queue(handler.dead_letter_queue, QUORUM), outcome_log_queue(settings.archive, handler)],
        [bucket_binding(handler, b, handler.partitions) for b in range(wire.BUCKETS)]
        + [Binding(settings.broker.exchange, handler.exchange, "exchange", pattern)
           for pattern in handler.bindings],
    )  # fmt: skip


def describe(settings: Settings) -> Topology:
    """Everything relay declares for `settings`."""
    described = ingress(settings) + state()
    for h in settings.handlers:
        described += handler(settings, h)
    return described


async def declare(channel: AbstractChannel, topology: Topology) -> None:
    """Declare idempotently, queues first and bindings last in their order; an object that
    exists with other arguments raises."""
    for q in topology.queues:
        await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
    for ex in topology.exchanges:
        await channel.declare_exchange(ex.name, ex.type, durable=True, arguments=ex.arguments)
    raw = await channel.get_underlay_channel()
    for b in topology.bindings:
        if b.destination_type == "queue":
            await raw.queue_bind(b.destination, b.source, b.routing_key, arguments=b.arguments)
        else:
            await raw.exchange_bind(b.destination, b.source, b.routing_key, arguments=b.arguments)


def is_stream(queue: Queue) -> bool:
    return queue.arguments.get("x-queue-type") == "stream"


async def without_existing_streams(connection: AbstractConnection, topology: Topology) -> Topology:
    """`topology` less the streams the broker has already: those are created, never declared
    again (the broker refuses other arguments, and retention may have changed in the config)."""
    queues = [
        q for q in topology.queues if not (is_stream(q) and await queue_exists(connection, q.name))
    ]
    return Topology(topology.exchanges, queues, topology.bindings)


async def unbind(channel: AbstractChannel, binding: Binding) -> None:
    raw = await channel.get_underlay_channel()
    b = binding
    if b.destination_type == "queue":
        await raw.queue_unbind(b.destination, b.source, b.routing_key, arguments=b.arguments)
    else:
        await raw.exchange_unbind(b.destination, b.source, b.routing_key, arguments=b.arguments)
