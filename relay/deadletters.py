"""Dead letters: how a message is dead-lettered, and listing, replaying and purging them.

`relay.<handler>.dlq` is a classic queue, the one documented exception to quorum queues:
listing reads every dead letter without removing it and then gives them back; a quorum queue
(3.10) returns many unacked messages in a scrambled order, a classic queue puts each back in
its place (tests/test_broker_traps.py shows both), and replay depends on that order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from relay import topology
from relay.delivery import Outcome
from relay.settings import HandlerSettings, Settings

DEAD_LETTER_HEADERS = (
    "x-relay-handler", "x-relay-reason", "x-relay-status", "x-relay-attempts",
    "x-relay-first-attempt", "x-relay-last-attempt",
)  # fmt: skip


def dead_letter(
    message: AbstractIncomingMessage,
    handler: HandlerSettings,
    outcome: Outcome,
    attempts: int,
    first_attempt: datetime,
) -> aio_pika.Message:
    """The dead letter of `message`: its body and headers, plus why and when it failed."""
    headers = {
        **(message.headers or {}),
        "x-relay-handler": handler.name,
        "x-relay-reason": outcome.detail,
        "x-relay-status": outcome.status or 0,
        "x-relay-attempts": attempts,
        "x-relay-first-attempt": first_attempt.isoformat(),
        "x-relay-last-attempt": datetime.now(UTC).isoformat(),
    }
    headers.pop("x-delivery-count", None)
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        timestamp=message.timestamp,
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    key: str
    event: str
    reason: str
    status: int
    attempts: int
    last_attempt: str

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers: dict[str, Any] = dict(message.headers or {})
        return cls(
            id=message.message_id or "?",
            key=str(headers.get("x-relay-key", "")),
            event=str(headers.get("x-relay-event", "")),
            reason=str(headers.get("x-relay-reason", "")),
            status=int(headers.get("x-relay-status") or 0),
            attempts=int(headers.get("x-relay-attempts") or 0),
            last_attempt=str(headers.get("x-relay-last-attempt", "")),
        )

    def age_seconds(self, now: datetime) -> float | None:
        try:
            return (now - datetime.fromisoformat(self.last_attempt)).total_seconds()
        except ValueError:
            return None

    def as_json(self) -> bytes:
        return orjson.dumps(self)


@asynccontextmanager
async def _held(
    settings: Settings, handler: HandlerSettings, limit: int | None = None
) -> AsyncIterator[tuple[AbstractChannel, list[AbstractIncomingMessage]]]:
    """Every dead letter (up to `limit`), held unacked; those not acked go back in place."""
    connection = await aio_pika.connect(settings.broker.url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.get_queue(handler.dead_letter_queue, ensure=True)
        held: list[AbstractIncomingMessage] = []
        while limit is None or len(held) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
        yield channel, held
        # Closing the channel returns what was not acked; a classic queue keeps their order.


async def list_dead_letters(
    settings: Settings, handler: HandlerSettings, limit: int
) -> list[DeadLetter]:
    async with _held(settings, handler, limit) as (_, held):
        return [DeadLetter.of(m) for m in held]


def _selector(ids: list[str] | None) -> Callable[[AbstractIncomingMessage], bool]:
    wanted = set(ids or ())
    return lambda message: not wanted or message.message_id in wanted


async def replay(settings: Settings, handler: HandlerSettings, ids: list[str] | None) -> int:
    """Publish dead letters back to the handler's partitions in queue order; return the count.

    Each goes through the handler's own exchange, so only this handler gets it again, and its
    key lands it in the same partition as before. Acked from the dead-letter queue only after
    the broker confirmed the republish.
    """
    selected = _selector(ids)
    replayed = 0
    async with _held(settings, handler) as (channel, held):
        exchange = await channel.get_exchange(handler.exchange, ensure=True)
        for message in held:
            if not selected(message):
                continue
            headers = {
                k: v for k, v in (message.headers or {}).items() if k not in DEAD_LETTER_HEADERS
            }
            # The partition for today's partition count (it may have changed since).
            key = str(headers.get(topology.KEY_HEADER, ""))
            headers.update(topology.partition_headers(key, [handler.partitions]))
            again = aio_pika.Message(
                message.body,
                headers={**headers, "x-relay-replayed": True},
                content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                timestamp=message.timestamp,
            )
            await exchange.publish(again, routing_key="", mandatory=True)
            await message.ack()
            replayed += 1
    return replayed


async def purge(settings: Settings, handler: HandlerSettings, ids: list[str] | None) -> int:
    """Remove dead letters (all, or those with the given ids); return the count."""
    selected = _selector(ids)
    purged = 0
    async with _held(settings, handler) as (_, held):
        for message in held:
            if selected(message):
                await message.ack()
                purged += 1
    return purged
