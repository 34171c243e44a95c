"""What relay uses of aiormq's undocumented internals: every such use is here.

relay/publisher.py writes publishes below aiormq's `basic_publish` (relay/amqp.py encodes them)
but leaves the broker's answers to aiormq: so it numbers each publish as `basic_publish` does,
registers its confirmation where aiormq resolves acks, nacks and returns (and fails what is
pending when the channel closes), and puts its frames on the connection's write queue. None of
that is aiormq's public API; tests/test_fences.py checks that a freshly built `aiormq.Channel`
still has it, and pyproject.toml bounds aiormq below its next minor release.

Plain functions, called directly: the hot path pays one call where it wrote the attributes.

aiormq advertises the `connection.blocked` capability and reads the broker's Connection.Blocked
and Unblocked frames, but only logs them (stdlib logging) and flips a private event: `on_blocked`
wraps its two private handlers so that relay hears of each change, with the broker's reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiormq
from aio_pika.abc import AbstractConnection
from aiormq.abc import ChannelFrame
from pamqp import commands as spec

BLOCKED_HANDLER = "_Connection__handle_connection_blocked"  # aiormq.Connection's private names
UNBLOCKED_HANDLER = "_Connection__handle_connection_unblocked"


def frame_max(channel: aiormq.Channel) -> int:
    """The connection's negotiated frame size, as aiormq derived `max_content_size` from it."""
    return int(channel.max_content_size) + aiormq.Channel.CONTENT_FRAME_SIZE


def expect_confirm(channel: aiormq.Channel, message_id: str) -> tuple[asyncio.Future[object], int]:
    """A confirmation for the next publish on `channel`, and its delivery tag: the broker numbers
    publishes in the order they arrive, so the publish must be written before any later one.
    aiormq resolves it on the broker's ack, nack or return (found by `message_id`), and fails it
    if the channel closes."""
    confirmation: asyncio.Future[object] = channel.create_future()
    channel.delivery_tag += 1
    tag: int = channel.delivery_tag
    channel.confirmations[tag] = confirmation
    channel.message_id_delivery_tag[message_id] = tag  # to find a returned message
    return confirmation, tag


def forget_confirm(channel: aiormq.Channel, tag: int) -> None:
    """Given up on: a late ack finds nothing to confirm."""
    channel.confirmations.pop(tag, None)


def forget_return(channel: aiormq.Channel, message_id: str, tag: int) -> None:
    """Done with the publish tagged `tag`: a return of `message_id` no longer finds it."""
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


def outgoing(channel: aiormq.Channel) -> asyncio.Queue[ChannelFrame]:
    """The queue aiormq's writer sends to the socket, in order, for every channel."""
    queue: asyncio.Queue[ChannelFrame] = channel.write_queue
    return queue


def frames(payload: bytes) -> ChannelFrame:
    """Encoded frames (relay/amqp.py) as an item of the write queue."""
    return ChannelFrame(payload=payload, should_close=False)


def underlay(connection: AbstractConnection) -> aiormq.Connection:
    """aiormq's connection under an open aio-pika one."""
    transport = connection.transport
    if transport is None or not isinstance(transport.connection, aiormq.Connection):
        raise TypeError("not an open aiormq connection")
    return transport.connection


def on_blocked(connection: aiormq.Connection, changed: Callable[[str | None], None]) -> None:
    """Call `changed(reason)` when the broker blocks `connection`'s publishes (a resource alarm:
    RabbitMQ's reason, such as "low on memory"), and `changed(None)` when it unblocks them. aiormq
    still does its own part first (it logs, and a channel opened while blocked waits)."""
    blocked: Callable[[spec.Connection.Blocked], Awaitable[None]]
    blocked = getattr(connection, BLOCKED_HANDLER)
    unblocked: Callable[[spec.Connection.Unblocked], Awaitable[None]]
    unblocked = getattr(connection, UNBLOCKED_HANDLER)

    async def on_block(frame: spec.Connection.Blocked) -> None:
        await blocked(frame)
        changed(frame.reason or "no reason given")

    async def on_unblock(frame: spec.Connection.Unblocked) -> None:
        await unblocked(frame)
        changed(None)

    setattr(connection, BLOCKED_HANDLER, on_block)
    setattr(connection, UNBLOCKED_HANDLER, on_unblock)
