"""The broker objects relay needs, as one description used to declare and to export them.

relay.activities (topic, alternate exchange relay.unrouted)
  --<pattern>--> relay.<handler> (x-consistent-hash on header x-relay-key)
                   --> relay.<handler>.<i> (quorum, single active consumer)
relay.unrouted (fanout) --> relay.unrouted (quorum)
relay.<handler>.dlq (classic: see relay/deadletters.py for why)
relay.state (stream: handler state records, see relay/state.py)
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Topology:
    exchanges: list[Exchange]
    queues: list[Queue]
    bindings: list[Binding]


def partition_arguments() -> dict[str, Any]:
    return {**QUORUM, "x-single-active-consumer": True}


def describe(settings: Settings, handlers: list[HandlerSettings] | None = None) -> Topology:
    """Everything relay declares for `settings` (optionally only some handlers)."""
    main = settings.broker.exchange
    exchanges = [
        Exchange(main, "topic", {"alternate-exchange": UNROUTED}),
        Exchange(UNROUTED, "fanout"),
    ]
    queues = [Queue(UNROUTED, QUORUM), Queue(STATE_STREAM, STREAM_ARGUMENTS)]
    bindings = [Binding(UNROUTED, UNROUTED, "queue", "")]
    for handler in settings.handlers if handlers is None else handlers:
        exchanges.append(
            Exchange(handler.exchange, "x-consistent-hash", {"hash-header": KEY_HEADER})
        )
        bindings += [Binding(main, handler.exchange, "exchange", key) for key in handler.bindings]
        for queue in handler.queues:
            queues.append(Queue(queue, partition_arguments()))
            bindings.append(Binding(handler.exchange, queue, "queue", "1"))  # key = weight
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
        if b.destination_type == "queue":
            await queues[b.destination].bind(exchanges[b.source], routing_key=b.routing_key)
        else:
            await exchanges[b.destination].bind(exchanges[b.source], routing_key=b.routing_key)


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
             "arguments": {}}
            for b in topology.bindings
        ],
    }  # fmt: skip


async def declare_all(settings: Settings) -> None:
    """Connect, declare everything for `settings`, disconnect (for `relay topology declare`)."""
    connection = await aio_pika.connect(settings.broker.url, timeout=10)
    async with connection:
        await declare(await connection.channel(), describe(settings))
