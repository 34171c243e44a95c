"""Reading a stream up to the newest message it held when the read began, writing nothing.

AMQP 0.9.1 has no end-of-stream signal (tests/test_streams.py), and the usual way round it, a
marker published into the stream and read up to, writes: into the archive it would be archived
traffic, into an outcome log a record of nothing. Instead a first consumer at x-stream-offset
"last" takes the stream's last chunk; the highest offset it delivers within CHUNK_SECONDS
(every delivery carries its offset in x-stream-offset) is the end, and the read proper stops at
the first delivery at or past it. A message written before the read began is never missed
(unless the last chunk took longer than CHUNK_SECONDS to arrive: then its tail is); later ones
may come too. A read from a time after the last chunk gets nothing within EMPTY_SECONDS and
ends there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelNotFoundEntity
from pamqp.commands import Basic

from relay.errors import NotFound, RelayError

READ_PREFETCH = 1000
END_PREFETCH = 10_000  # the last chunk, taken whole (a chunk holds a burst of writes)
EMPTY_SECONDS = 1.0  # a read that gets nothing by then has nothing to read
CHUNK_SECONDS = 0.2  # the last chunk comes at once, well within this
STALL_SECONDS = 30.0  # a read short of its end that gets nothing this long fails


@dataclass(frozen=True, slots=True)
class Entry:
    """A message of a stream."""

    offset: int
    exchange: str
    routing_key: str
    properties: Any  # pamqp BasicProperties: headers, message_id, timestamp, ...
    body: bytes

    @classmethod
    def of(cls, message: DeliveredMessage) -> Entry:
        deliver = cast(Basic.Deliver, message.delivery)
        properties = message.header.properties
        return cls(
            offset=_offset(message),
            exchange=deliver.exchange or "",
            routing_key=deliver.routing_key or "",
            properties=properties,
            body=message.body,
        )


def _offset(message: DeliveredMessage) -> int:
    offset = (message.header.properties.headers or {}).get("x-stream-offset")
    if not isinstance(offset, int):
        raise RelayError(f"a stream delivery without its offset: {offset!r}")
    return offset


async def stream_end(connection: AbstractConnection, stream: str, missing: str) -> int | None:
    """The offset of the newest message `stream` holds (None: it is empty): the highest of its
    last chunk, which a consumer at "last" gets at once. NotFound, saying `missing`, if there
    is no such stream."""
    channel = await connection.channel(publisher_confirms=False)
    async with channel:
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=END_PREFETCH)  # acks nothing: the chunk, and no more
        arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        try:
            await raw.basic_consume(stream, arrived.put, arguments={"x-stream-offset": "last"})
        except ChannelNotFoundEntity:
            raise NotFound(f"{stream} does not exist: {missing}") from None
        try:
            end = _offset(await asyncio.wait_for(arrived.get(), EMPTY_SECONDS))
        except TimeoutError:
            return None
        # The rest of the chunk comes at once; what comes later was written after the start.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CHUNK_SECONDS):
                while True:
                    end = max(end, _offset(await arrived.get()))
        return end


async def read_stream(
    connection: AbstractConnection, stream: str, start: datetime, end: int
) -> AsyncGenerator[Entry, None]:
    """`stream`'s messages from the chunk written at `start` (whole seconds) on, in stream
    order, up to the first at or past offset `end`; nothing if nothing comes by EMPTY_SECONDS
    (`start` is after the last chunk)."""
    channel = await connection.channel(publisher_confirms=False)
    async with channel:
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=READ_PREFETCH)  # a stream consumer needs one
        arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        await raw.basic_consume(stream, arrived.put, arguments={"x-stream-offset": start})
        try:
            message = await asyncio.wait_for(arrived.get(), EMPTY_SECONDS)
        except TimeoutError:
            return
        unacked = 0
        while True:
            entry = Entry.of(message)
            unacked += 1
            if unacked >= READ_PREFETCH // 2:  # credit for the next: nothing leaves a stream
                deliver = cast(Basic.Deliver, message.delivery)
                await raw.basic_ack(cast(int, deliver.delivery_tag), multiple=True)
                unacked = 0
            yield entry
            if entry.offset >= end:
                return
            try:
                message = await asyncio.wait_for(arrived.get(), STALL_SECONDS)
            except TimeoutError:
                raise RelayError(
                    f"reading {stream}: nothing came for {STALL_SECONDS:.0f}s at offset "
                    f"{entry.offset}, short of {end}"
                ) from None
