"""The ids the ingress processes accepted within the repeats horizon, known to every replica: a
copy of one is answered `duplicate` and not published (SPEC "Ingress HTTP").

Each process remembers what it accepts at once, and every FLUSH_SECONDS appends the digests of
what it accepted since (relay/seen.py: 8 bytes an id, little-endian, the AMQP timestamp saying
when) as one message to the stream relay.ids, kept for the horizon. Every process follows that
stream from the horizon's start, so it learns what the others accepted within about
PROPAGATION_SECONDS, and a process that starts knows what was accepted before it once it has
read the stream up to its end: it reports ready only then.

Left: ids accepted in the last FLUSH_SECONDS before a process dies are not appended; a copy of
one is published again, and each handler's own memory (relay/worker/decided.py) drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from array import array
from datetime import UTC, datetime, timedelta

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from relay import metrics
from relay.broker import BROKER_ERRORS, keep_connected, until_set
from relay.errors import NotFound
from relay.seen import SeenIds
from relay.settings import Settings
from relay.streams import stream_end
from relay.topology import ACCEPTED_IDS

log = structlog.get_logger()

FLUSH_SECONDS = 0.5
PROPAGATION_SECONDS = 2.0  # documented: a copy this much later than the first is a duplicate
READ_PREFETCH = 100
MAX_PENDING = 1_000_000  # digests waiting for the broker; beyond, the oldest are not appended
RETRY_SECONDS = 1.0


class AcceptedIds:
    """What any ingress process accepted within the horizon; with `follow=False` only what
    this one accepted (tests, without a broker)."""

    def __init__(self, settings: Settings, *, follow: bool = True) -> None:
        self._settings = settings
        self._ids = SeenIds(settings.repeats.horizon_seconds, settings.repeats.max_ids)
        self._pending = array("Q")
        self._read = -1  # the highest offset of relay.ids read so far
        self._caught_up = not follow
        self._moved = asyncio.Event()  # set whenever more of relay.ids was read
        self._follow = follow
        self._task: asyncio.Task[None] | None = None
        self._remembered = metrics.REMEMBERED.labels("accepted")
        self._process = uuid.uuid4().hex  # names this process's batches in relay.ids

    @property
    def ready(self) -> bool:
        """Whether relay.ids has been read up to where it ended when this process started."""
        return self._caught_up

    def seen(self, accepted: int) -> bool:
        """Whether the id of digest `accepted` (`relay.seen.digest("", message_id)`) was accepted
        within the horizon."""
        return self._ids.seen(accepted, time.time())

    def add(self, accepted: int) -> None:
        """The id of digest `accepted` has just been accepted here (its publish confirmed)."""
        self._ids.add(accepted, time.time())
        if len(self._pending) < MAX_PENDING:
            self._pending.append(accepted)

    def start(self) -> None:
        if self._follow:
            urls = self._settings.broker.connection_urls
            self._task = asyncio.create_task(keep_connected(urls, self._session, what="ids"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _session(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        end = await until_set(self._stream_end(connection), lost)
        if lost.is_set():
            return
        channel = await connection.channel(publisher_confirms=True)
        channel.close_callbacks.add(lambda *_: lost.set())
        follower = asyncio.ensure_future(self._read_stream(connection, lost))
        follower.add_done_callback(lambda _: lost.set())  # it ends only with the connection
        try:
            if not self._caught_up:
                if end is not None:
                    await until_set(self._read_up_to(end), lost)
                if not lost.is_set():
                    self._caught_up = True
                    log.info("accepted ids known", ids=len(self._ids), component="ingress")
            while not lost.is_set():
                await until_set(asyncio.sleep(FLUSH_SECONDS), lost)
                await self._flush(channel)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    async def _stream_end(self, connection: AbstractConnection) -> int | None:
        """The offset relay.ids ends at (None: empty), once it exists (the ingress's publisher
        creates it, on another connection)."""
        while True:
            try:
                return await stream_end(connection, ACCEPTED_IDS, "it is created at start")
            except NotFound:
                await asyncio.sleep(RETRY_SECONDS)

    async def _read_up_to(self, end: int) -> None:
        while self._read < end:
            self._moved.clear()
            await self._moved.wait()

    async def _flush(self, channel: aio_pika.abc.AbstractChannel) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, array("Q")
        body = array("Q", batch)
        if sys.byteorder == "big":
            body.byteswap()
        message = aio_pika.Message(
            body.tobytes(),
            timestamp=datetime.now(UTC),
            app_id=self._process,  # read back, this process skips its own
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await asyncio.wait_for(channel.default_exchange.publish(message, ACCEPTED_IDS), 10)
        except BROKER_ERRORS as exc:
            log.warning("accepted ids not appended, trying again", error=repr(exc), ids=len(batch))
            self._pending = batch + self._pending  # appended next time, if the session lasts
            raise

    async def _read_stream(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        horizon = self._settings.repeats.horizon_seconds
        start: int | datetime = self._read + 1
        if self._read < 0:
            start = datetime.now(UTC) - timedelta(seconds=horizon)
        channel = await connection.channel(publisher_confirms=False)
        async with channel:
            await channel.set_qos(prefetch_count=READ_PREFETCH)  # a stream consumer needs one
            queue = await channel.get_queue(ACCEPTED_IDS, ensure=False)

            async def on_message(message: AbstractIncomingMessage) -> None:
                offset = (message.headers or {}).get("x-stream-offset")
                if isinstance(offset, int) and offset > self._read:
                    if message.app_id != self._process:
                        self._take(message)
                    self._read = offset
                    self._moved.set()
                await message.ack()

            await queue.consume(on_message, arguments={"x-stream-offset": start})
            await lost.wait()

    def _take(self, message: AbstractIncomingMessage) -> None:
        ids = array("Q")
        try:
            ids.frombytes(message.body)
        except ValueError:
            return  # not a batch of digests
        if sys.byteorder == "big":
            ids.byteswap()
        stamped = message.timestamp
        at = stamped.replace(tzinfo=stamped.tzinfo or UTC).timestamp() if stamped else time.time()
        add = self._ids.add
        for accepted in ids:
            add(accepted, at)
        self._remembered.set(len(self._ids))
