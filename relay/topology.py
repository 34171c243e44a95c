"""The broker objects relay needs, as one description used to declare and to export them.

relay.activities (topic, alternate exchange relay.unrouted)
  --<pattern>--> relay.<handler> (headers: relay-p<N> = i, N = the handler's partitions)
                   --> relay.<handler>.<i> (quorum, single active consumer)
relay.unrouted (fanout) --> relay.unrouted (quorum)
relay.<handler>.dlq (classic: see relay/deadletters.py for why)
relay.state (stream: handler state records, see relay/state.py)

The publisher picks the partition: crc32(ordering key) % N, sent as header relay-p<N> for
each partition count N in use. The mapping is stateless, so a key stays in its partition across
broker restarts; the consistent-hash exchange plugin rebuilds its ring on restart and may move
keys (rabbitmq-server #3386), which would reorder a key whose messages wait in the old queue.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from relay.settings import HandlerSettings, Settings
from relay.state import STATE_STREAM, STREAM_ARGUMENTS

UNROUTED = "relay.unrouted"
KEY_HEADER = "x-relay-key"
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
CLASSIC: dict[str, Any] = {}  # the default queue type


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
    exchanges: list[Exchange]
    queues: list[Queue]
    bindings: list[Binding]


def partition_arguments() -> dict[str, Any]:
    return {**QUORUM, "x-single-active-consumer": True}


def partition_header(partitions: int) -> str:
    # Not `x-...`: a headers exchange ignores binding arguments that start with `x-`.
    return f"relay-p{partitions}"


def partition_headers(key: str, counts: Iterable[int]) -> dict[str, str]:
    """The partition of `key` for each partition count: crc32(key) % count."""
    digest = zlib.crc32(key.encode())
    return {partition_header(n): str(digest % n) for n in counts}


def partition_counts(settings: Settings) -> list[int]:
    return sorted({h.partitions for h in settings.handlers})


def describe(
    settings: Settings, handlers: list[HandlerSettings] | None = None, *, state: bool = True
) -> Topology:
    """Everything relay declares for `settings`: optionally only some handlers, or without the
    state stream (the ingress does not write it)."""
    main = settings.broker.exchange
    exchanges = [
        Exchange(main, "topic", {"alternate-exchange": UNROUTED}),
        Exchange(UNROUTED, "fanout"),
    ]
    queues = [Queue(UNROUTED, QUORUM)]
    if state:
        queues.append(Queue(STATE_STREAM, STREAM_ARGUMENTS))
    bindings = [Binding(UNROUTED, UNROUTED, "queue", "")]
    for handler in settings.handlers if handlers is None else handlers:
        exchanges.append(Exchange(handler.exchange, "headers"))
        bindings += [Binding(main, handler.exchange, "exchange", key) for key in handler.bindings]
        header = partition_header(handler.partitions)
        for i, queue in enumerate(handler.queues):
            queues.append(Queue(queue, partition_arguments()))
            match = {"x-match": "all", header: str(i)}
            bindings.append(Binding(handler.exchange, queue, "queue", "", match))
        queues.append(Queue(handler.dead_letter_queue, CLASSIC))
    return Topology(exchanges, queues, bindings)


async def declare(channel: AbstractChannel, topology: Topology) -> None:
    """Declare idempotently; an object that exists with other arguments raises."""
    exchanges = {}
    for ex in topology.exchanges:
        exchanges[ex.name] = await channel.declare_exchange(
            ex.name, ex.type, durable=True, arguments=ex.arguments
        )
    queues = {}
    for q in topology.queues:
        queues[q.name] = await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
    for b in topology.bindings:
        destination = queues if b.destination_type == "queue" else exchanges
        await destination[b.destination].bind(
            exchanges[b.source], routing_key=b.routing_key, arguments=b.arguments
        )


def export(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """RabbitMQ definitions JSON, as the management UI imports it."""
    return {
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": True,
             "auto_delete": False, "internal": False, "arguments": e.arguments}
            for e in topology.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False,
             "arguments": q.arguments}
            for q in topology.queues
        ],
        "bindings": [
            {"source": b.source, "vhost": vhost, "destination": b.destination,
             "destination_type": b.destination_type, "routing_key": b.routing_key,
             "arguments": b.arguments}
            for b in topology.bindings
        ],
    }  # fmt: skip


async def declare_all(settings: Settings) -> None:
    """Connect, declare everything for `settings`, disconnect (for `relay topology declare`)."""
    connection = await aio_pika.connect(settings.broker.url, timeout=10)
    async with connection:
        await declare(await connection.channel(), describe(settings))
