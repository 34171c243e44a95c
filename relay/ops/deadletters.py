"""Dead letters: listing, replaying and purging them (relay/wire.py builds them).

`relay.<handler>.dlq` is a quorum queue, replicated like the partitions. Every command reads it
through a consumer and holds what it read unacked: what it does not ack (all of it, for a list)
goes back when its channel closes, at the head and in queue order. Not with `basic.get`: a
quorum queue puts many messages taken that way back scrambled (tests/test_broker_traps.py shows
both), and replay depends on that order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity

from relay import wire
from relay.broker import connect
from relay.errors import NotFound
from relay.settings import HandlerSettings, Settings

MAX_PREFETCH = 65535  # basic.qos prefetch-count is 16 bits; 0 is unlimited
QUIET_SECONDS = 5.0  # a read ends early when no more come for this long (another reader holds them)


@asynccontextmanager
async def _held(
    settings: Settings, handler: HandlerSettings, limit: int | None = None
) -> AsyncIterator[tuple[AbstractChannel, list[AbstractIncomingMessage]]]:
    """The dead letters (up to `limit`) in queue order, held unacked; those not acked go back in
    place when the channel closes."""
    connection = await connect(settings.broker)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            queue = await channel.declare_queue(handler.dead_letter_queue, passive=True)
        except ChannelNotFoundEntity:
            raise NotFound(
                f"{handler.dead_letter_queue} does not exist: run `relay topology declare`, or "
                f"start a worker of handler {handler.name!r}"
            ) from None
        ready = queue.declaration_result.message_count or 0
        wanted = ready if limit is None else min(ready, limit)
        held: list[AbstractIncomingMessage] = []
        if wanted:
            await channel.set_qos(prefetch_count=wanted if wanted <= MAX_PREFETCH else 0)
            arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            tag = await queue.consume(arrived.put, no_ack=False)
            while len(held) < wanted:
                try:
                    held.append(await asyncio.wait_for(arrived.get(), QUIET_SECONDS))
                except TimeoutError:
                    break
            await queue.cancel(tag)  # what it holds stays held until the channel closes
        yield channel, held
        # Closing the channel returns what was not acked, at the head, in order.


async def list_dead_letters(
    settings: Settings, handler: HandlerSettings, limit: int, ids: list[str] | None = None
) -> list[wire.DeadLetter]:
    """The first `limit` dead letters in queue order, or of those with the given ids (all read to
    find them; NotFound if one is not there)."""
    return [letter for letter, _ in await read_dead_letters(settings, handler, limit, ids)]


async def read_dead_letters(
    settings: Settings, handler: HandlerSettings, limit: int, ids: list[str] | None = None
) -> list[tuple[wire.DeadLetter, bytes]]:
    """As `list_dead_letters`, each with its body (the envelope relay delivered)."""
    selected = _selector(ids)
    async with _held(settings, handler, None if ids else limit) as (_, held):
        chosen = [m for m in held if selected(m)]
    _all_found(handler, ids, chosen)
    return [(wire.DeadLetter.of(m), m.body) for m in chosen[:limit]]


def _selector(ids: list[str] | None) -> Callable[[AbstractIncomingMessage], bool]:
    wanted = set(ids or ())
    return lambda message: not wanted or message.message_id in wanted


def _all_found(
    handler: HandlerSettings, ids: list[str] | None, held: list[AbstractIncomingMessage]
) -> None:
    """NotFound naming the ids none of `held` has, so that a command acts on all or none."""
    found = {m.message_id for m in held}
    missing = [i for i in dict.fromkeys(ids or ()) if i not in found]
    if missing:
        letters = "dead letter" if len(missing) == 1 else "dead letters"
        named = ", ".join(repr(i) for i in missing)
        raise NotFound(f"{letters} {named} not found in {handler.dead_letter_queue}")


async def replay(settings: Settings, handler: HandlerSettings, ids: list[str] | None) -> int:
    """Publish dead letters (all, or those with the given ids: NotFound, and none published, if
    one is not there) back to the handler's partitions in queue order; return the count.

    Each goes through the handler's own exchange, so only this handler gets it again, and its
    key lands it in the same partition as before. Acked from the dead-letter queue only after
    the broker confirmed the republish.
    """
    selected = _selector(ids)
    replayed = 0
    async with _held(settings, handler) as (channel, held):
        _all_found(handler, ids, held)
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
    """Remove dead letters (all, or those with the given ids: NotFound, and none removed, if one
    is not there); return the count."""
    selected = _selector(ids)
    purged = 0
    async with _held(settings, handler) as (_, held):
        _all_found(handler, ids, held)
        for message in held:
            if selected(message):
                await message.ack()
                purged += 1
    return purged
