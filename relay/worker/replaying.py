"""A worker's part in replays (relay/replays.py), as the records of relay.state tell them: it
consumes each replay's queue like a partition of its handler, stops once the replay is done (and
deletes the queue), and fills a replay that nobody fills: a backfill, or a `relay replay` that
ended before its queue was full.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aio_pika.abc import AbstractConnection

from relay import replays
from relay.broker import BROKER_ERRORS, give_turn, take_turn, until_set
from relay.replays import Replay
from relay.worker.partition import Partition
from relay.worker.scheduler import HandlerScheduler

log = structlog.get_logger()

TAKEOVER_SECONDS = 5.0  # how often a worker looks for a replay nobody fills


class Replays:
    def __init__(
        self,
        exchange: str,
        deliveries: dict[str, HandlerScheduler],
        partitions: list[Partition],
    ) -> None:
        self._exchange = exchange  # the archive's messages of this relay were published to it
        self._deliveries = deliveries
        self._partitions = partitions  # the worker's: replay queues are consumed as partitions
        self._replays: dict[str, Replay] = {}
        self._marked: dict[str, datetime] = {}
        self._attempts: dict[str, int] = {}  # the latest attempt of each replay
        self._filled: set[str] = set()
        self._consumed: dict[str, Partition] = {}  # replay -> its queue's partition
        self._tasks: set[asyncio.Task[None]] = set()

    async def take(
        self,
        record: dict[str, Any],
        connection: AbstractConnection,
        over: asyncio.Event,
        consume: Callable[[Partition], None],
    ) -> None:
        """Take in a record of relay.state (any kind; those of no replay are left alone)."""
        kind = record["kind"]
        if kind == "replay":
            replay = Replay.of(record)
            self._replays[replay.id] = replay
            self._deliveries[replay.handler].require(replay.fill, replay.before)
            task = asyncio.create_task(self._fill_if_nobody_does(connection, over, replay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "marked":
            self._marked.setdefault(record["replay"], datetime.fromisoformat(record["at"]))
        elif kind == "attempt" and record["replay"] in self._replays:
            self._attempts[record["replay"]] = int(record["attempt"])
            self._end(record["replay"])
            deliveries = self._deliveries[record["handler"]]
            partition = Partition(deliveries.handler, -1, deliveries, replay_queue=record["queue"])
            deliveries.partitions.append(partition)
            self._partitions.append(partition)
            self._consumed[record["replay"]] = partition
            consume(partition)
        elif kind == "release":
            for replay in self._replays.values():
                if record["change"] == replay.fill:
                    self._filled.add(replay.id)
                elif record["change"] == replay.after and self._end(replay.id):
                    await replays.delete_queue(connection, replay.queue(self._attempts[replay.id]))

    def close(self) -> None:
        """The session is over: the next one takes in the records again."""
        for task in self._tasks:
            task.cancel()
        for replay in list(self._consumed):
            self._end(replay)

    def _end(self, replay: str) -> bool:
        """Stop consuming the replay's queue, if this worker does."""
        partition = self._consumed.pop(replay, None)
        if partition is None:
            return False
        partition.ended.set()
        self._deliveries[partition.handler.name].partitions.remove(partition)
        self._partitions.remove(partition)
        return True

    async def _fill_if_nobody_does(
        self, connection: AbstractConnection, over: asyncio.Event, replay: Replay
    ) -> None:
        """Until the replay's queue is filled: whenever its turn is free, fill it."""
        while not over.is_set():
            await until_set(asyncio.sleep(TAKEOVER_SECONDS), over)
            if over.is_set() or replay.id in self._filled:
                return
            try:
                if await take_turn(connection, replay.turn):
                    try:
                        if replay.id not in self._filled:
                            await self._fill(connection, replay)
                    finally:
                        await give_turn(connection, replay.turn)
            except (*BROKER_ERRORS, TimeoutError) as exc:
                log.warning("replay not filled, trying again", replay=replay.id, error=repr(exc))

    async def _fill(self, connection: AbstractConnection, replay: Replay) -> None:
        handler = self._deliveries[replay.handler].handler
        attempt = self._attempts.get(replay.id, 0) + 1
        log.info("filling a replay nobody fills", handler=handler.name, replay=replay.id,
                 attempt=attempt)  # fmt: skip
        for earlier in range(1, attempt):
            await replays.delete_queue(connection, replay.queue(earlier))
        if replay.id not in self._marked:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            async with channel:
                await replays.mark(channel, handler, replay)
        marked_at = self._marked.get(replay.id, datetime.now(UTC))
        await replays.fill(
            connection, self._exchange, handler, replay, attempt=attempt, marked_at=marked_at
        )
