"""What a handler's deliveries have decided, as one worker knows it: the ids in the handler's
outcome log (relay.<handler>.outcomes) within the repeats horizon, followed as the log grows, so
that a copy of a message whose outcome is recorded is acked without delivery (SPEC "Repeats").

All copies of an event carry its key, so they land in one partition, whose single active
consumer decides, on the outcome log every worker of the handler follows. A partition that starts
receiving (its worker has just become the active consumer: at start, after a failover, a
reconnect or a partition change) first reads the log up to its end as of then, so it knows every
outcome its previous consumer recorded before it let go (relay/worker/partition.py).

Left: a delivery whose handler answered but whose record the broker had not confirmed when its
worker died comes again and is delivered again (the crash window docs/GUARANTEES.md names).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta

import structlog
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from relay import metrics, wire
from relay.broker import BROKER_ERRORS, until_set
from relay.errors import NotFound
from relay.seen import SeenIds, digest
from relay.settings import HandlerSettings, RepeatsSettings
from relay.streams import stream_end

log = structlog.get_logger()

READ_PREFETCH = 500
RETRY_SECONDS = 1.0


class Decided:
    """The handler's decided ids (delivered or dead-lettered) within the horizon."""

    def __init__(self, handler: HandlerSettings, repeats: RepeatsSettings) -> None:
        self.handler = handler.name
        self.stream = handler.outcome_log
        self._horizon = repeats.horizon_seconds
        self._ids = SeenIds(repeats.horizon_seconds, repeats.max_ids)
        self._read = -1  # the highest offset of the log read so far
        self._moved = asyncio.Event()  # set whenever more of the log was read
        self._connection: AbstractConnection | None = None
        self._follower: asyncio.Task[None] | None = None
        self._repeats = metrics.REPEATS.labels(handler.name)
        self._remembered = metrics.REMEMBERED.labels(f"handler {handler.name}")

    def add(self, message_id: str) -> None:
        """`message_id`'s outcome has just been recorded (confirmed) by this worker."""
        self._ids.add(digest("", message_id), time.time())

    def is_repeat(self, message_id: str) -> bool:
        """Whether an outcome of `message_id` is recorded within the horizon (counted)."""
        if not self._ids.seen(digest("", message_id), time.time()):
            return False
        self._repeats.inc()
        return True

    def start(self, connection: AbstractConnection, over: asyncio.Event) -> None:
        """Follow the log on `connection` (a broker session) until `over`: from where an
        earlier session stopped, at first from the horizon's start."""
        self._connection = connection
        self._follower = asyncio.ensure_future(self._follow(connection, over))

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower

    async def caught_up(self) -> None:
        """Return once the log is read up to the last record it held when called; tried again
        while the broker fails (a caller that no longer needs it cancels it)."""
        while True:
            connection = self._connection
            try:
                if connection is None:
                    raise ConnectionError("no broker session yet")
                end = await stream_end(connection, self.stream, "the handler's outcome log")
                break
            except (*BROKER_ERRORS, NotFound) as exc:
                log.warning("outcome log not readable, trying again", handler=self.handler,
                            error=repr(exc))  # fmt: skip
                await asyncio.sleep(RETRY_SECONDS)
        while end is not None and self._read < end:
            self._moved.clear()
            await self._moved.wait()

    async def _follow(self, connection: AbstractConnection, over: asyncio.Event) -> None:
        while not over.is_set():
            try:
                await self._read_log(connection, over)
            except BROKER_ERRORS as exc:
                if over.is_set():
                    return
                log.warning("outcome log not followed, trying again", handler=self.handler,
                            error=repr(exc))  # fmt: skip
                await until_set(asyncio.sleep(RETRY_SECONDS), over)

    async def _read_log(self, connection: AbstractConnection, over: asyncio.Event) -> None:
        start: int | datetime = self._read + 1
        if self._read < 0:
            start = datetime.now(UTC) - timedelta(seconds=self._horizon)
        channel = await connection.channel(publisher_confirms=False)
        async with channel:
            await channel.set_qos(prefetch_count=READ_PREFETCH)  # a stream consumer needs one
            queue = await channel.get_queue(self.stream, ensure=False)
            closed = asyncio.Event()
            channel.close_callbacks.add(lambda *_: closed.set())

            async def on_message(message: AbstractIncomingMessage) -> None:
                offset = (message.headers or {}).get("x-stream-offset")
                if isinstance(offset, int) and offset > self._read:
                    self._take(message.body)
                    self._read = offset
                    self._moved.set()
                await message.ack()

            await queue.consume(on_message, arguments={"x-stream-offset": start})
            await until_set(closed.wait(), over)
            if closed.is_set() and not over.is_set():
                raise ConnectionError(f"{self.stream}: channel closed")

    def _take(self, body: bytes) -> None:
        for record in wire.read_outcomes(body):
            try:
                at = datetime.fromisoformat(str(record["at"])).timestamp()
            except (KeyError, ValueError):
                at = time.time()
            self._ids.add(digest("", str(record["id"])), at)
        self._remembered.set(len(self._ids))
