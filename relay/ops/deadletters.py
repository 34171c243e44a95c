"""Dead letters: listing, replaying and purging them (relay/wire.py builds them).

`relay.<handler>.dlq` is a classic queue, the one documented exception to quorum queues:
listing reads every dead letter without removing it and then gives them back; a quorum queue
(3.10) returns many unacked messages in a scrambled order, a classic queue puts each back in
its place (tests/test_broker_traps.py shows both), and replay depends on that order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity

from relay import wire
from relay.broker import connect
from relay.errors import NotFound
from relay.settings import HandlerSettings, Settings


@asynccontextmanager
async def _held(
    settings: Settings, handler: HandlerSettings, limit: int | None = None
) -> AsyncIterator[tuple[AbstractChannel, list[AbstractIncomingMessage]]]:
    """Every dead letter (up to `limit`), held unacked; those not acked go back in place."""
    connection = await connect(settings.broker)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            queue = await channel.get_queue(handler.dead_letter_queue, ensure=True)
        except ChannelNotFoundEntity:
            raise NotFound(
                f"{handler.dead_letter_queue} does not exist: no worker of handler "
                f"{handler.name!r} has run yet"
            ) from None
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
) -> list[wire.DeadLetter]:
    async with _held(settings, handler, limit) as (_, held):
        return [wire.DeadLetter.of(m) for m in held]


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
            # Its bucket routes it to whichever partition owns the bucket today.
            await exchange.publish(
                wire.replayed(message.body, message), routing_key="", mandatory=True
            )
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
