"""The worker: consumes its handlers' partitions and delivers to the handlers.

Building, running and test-running are separate: `Worker(settings)` builds (and fails at once
on a `call` that cannot be imported), `run()` blocks, `async_run()` is awaitable (tests).
Shutdown: stop taking deliveries, let those in flight finish (up to each handler's timeout),
return the rest to the head of their queues by closing the channels, then the connection.

The worker's publishes (dead letters, outcome and state records, replay fills) go on a
connection of their own: during a memory or disk alarm the broker blocks a connection once it
publishes and then reads nothing more from it, acks included. So consuming and acking go on
while the broker is blocked; a message whose dead letter or outcome record waits for the broker
is acked only once that is confirmed (Partition.settle), so it is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import aio_pika
import aiohttp
import structlog
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity

from relay import metrics, provision, topology, wire
from relay.broker import (
    BROKER_ERRORS,
    Blocked,
    another_connection,
    close_quietly,
    keep_connected,
    queue_exists,
    until_set,
)
from relay.settings import Settings
from relay.worker.delivery import CallTarget, HttpTarget, Target
from relay.worker.partition import Partition
from relay.worker.replaying import Replays
from relay.worker.scheduler import HandlerScheduler

log = structlog.get_logger()

DEPTH_INTERVAL_SECONDS = 10
REOPEN_SECONDS = 1.0  # after the broker closed a partition's channel
MISSING_RETRY_SECONDS = 30.0  # a partition queue of the config that does not exist
PUBLISH_TIMEOUT_SECONDS = 10.0  # dead letters and state records


class Worker:
    """Consumes the partitions of the configured handlers (all, or those named)."""

    def __init__(self, settings: Settings, handler_names: list[str] | None = None) -> None:
        self._settings = settings
        names = handler_names or [h.name for h in settings.handlers]
        self._handlers = [settings.handler(name) for name in names]
        # Python handlers are imported now, so a bad `call` fails at start (exit 2).
        self._targets: dict[str, Target] = {
            h.name: CallTarget(h, f"handlers[{settings.handlers.index(h)}].call")
            for h in self._handlers
            if h.call
        }
        self._stopping = asyncio.Event()
        self._over: asyncio.Event | None = None
        self._deliveries: dict[str, HandlerScheduler] = {}
        self._partitions: list[Partition] = []
        self.ready = asyncio.Event()  # set while consuming
        self.blocked = Blocked("worker")  # its publishing connection's

    def stop(self) -> None:
        """Stop taking deliveries; in-flight ones finish, the rest go back to their queues."""
        self._stopping.set()
        for deliveries in self._deliveries.values():
            deliveries.halt()
        if self._over is not None:
            self._over.set()

    async def async_run(self) -> None:
        """Consume until `stop()`, reconnecting whenever the broker connection drops."""
        in_flight = sum(h.concurrency for h in self._handlers)
        connector = aiohttp.TCPConnector(limit=in_flight)
        # Answers are read raw: a compressed answer is never inflated (delivery._read_start).
        async with aiohttp.ClientSession(auto_decompress=False, connector=connector) as session:
            for h in self._handlers:
                target = self._targets.get(h.name) or HttpTarget(h, session)
                self._deliveries[h.name] = HandlerScheduler(h, target, self._settings.repeats)
            self._partitions = [
                Partition(h, i, self._deliveries[h.name])
                for h in self._handlers
                for i in range(h.partitions)
            ]
            for partition in self._partitions:
                self._deliveries[partition.handler.name].partitions.append(partition)
            await keep_connected(
                self._settings.broker.connection_urls,
                self._session,
                what="worker",
                until=self._stopping,
            )

    async def _session(self, connection: AbstractConnection, over: asyncio.Event) -> None:
        self._over = over
        if self._stopping.is_set():
            return
        publishing = await another_connection(connection, "worker publishing")
        publishing.close_callbacks.add(lambda *_: over.set())
        self.blocked.watch(publishing)
        try:
            await self._consume(connection, publishing, over)
        finally:
            await asyncio.shield(close_quietly(publishing))
            self.blocked.changed(None)  # the next connection starts unblocked

    async def _consume(
        self, connection: AbstractConnection, publishing: AbstractConnection, over: asyncio.Event
    ) -> None:
        """Consume on `connection`, publish on `publishing`, until `over`."""
        publisher = await publishing.channel(publisher_confirms=True, on_return_raises=True)
        publisher.close_callbacks.add(lambda *_: over.set())

        async def publish(message: aio_pika.Message, queue: str) -> None:
            """Confirmed within PUBLISH_TIMEOUT_SECONDS, or TimeoutError (then the caller tries
            again); while the broker blocks the connection, it waits on: a copy sent again
            would be a duplicate dead letter or record once the block ends."""
            sending = asyncio.ensure_future(
                publisher.default_exchange.publish(message, queue, mandatory=True)
            )
            try:
                while not (await asyncio.wait({sending}, timeout=PUBLISH_TIMEOUT_SECONDS))[0]:
                    if self.blocked.reason is None:
                        raise TimeoutError
            finally:
                sending.cancel()
            sending.result()

        await provision.create_missing(
            connection, publisher, self._settings, self._handlers, by="worker"
        )
        for deliveries in self._deliveries.values():
            deliveries.start(publish)
            deliveries.decided.start(connection, over)
        consuming: dict[str, asyncio.Future[None]] = {}

        def consume(partition: Partition) -> None:
            if partition.queue not in consuming:
                consuming[partition.queue] = asyncio.ensure_future(
                    self._keep_consuming(partition, connection, over)
                )

        for partition in self._partitions:
            consume(partition)
        self.ready.set()
        log.info("worker consuming", partitions=[p.queue for p in self._partitions])
        replaying = Replays(self._settings.broker.exchange, self._deliveries, self._partitions)
        background = [
            asyncio.ensure_future(self._watch_depths(connection, over)),
            asyncio.ensure_future(
                self._follow_records(connection, publishing, over, consume, replaying)
            ),
        ]
        try:
            await over.wait()
            await asyncio.gather(*consuming.values())
        finally:
            self.ready.clear()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            replaying.close()
            for deliveries in self._deliveries.values():
                await deliveries.stop()
                await deliveries.decided.stop()

    async def _follow_records(
        self,
        connection: AbstractConnection,
        publishing: AbstractConnection,
        over: asyncio.Event,
        consume: Callable[[Partition], None],
        replaying: Replays,
    ) -> None:
        """Follows relay.state from its start: releases of partition changes, layouts whose
        partitions may still hold messages (consumed while they exist), and replays (filled on
        `publishing`)."""
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=500)  # a stream consumer needs a prefetch
        stream = await channel.get_queue(topology.STATE_STREAM, ensure=False)

        records: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_record(message: AbstractIncomingMessage) -> None:
            records.put_nowait(message.body)  # before any await: in stream order
            await message.ack()

        await stream.consume(on_record, arguments={"x-stream-offset": "first"})
        while not over.is_set():
            body = await until_set(records.get(), over)
            record = wire.read_record(body) if body is not None else None
            deliveries = self._deliveries.get(record["handler"]) if record else None
            if record is None or deliveries is None:
                continue
            if record["kind"] == "release":
                await deliveries.take_release(
                    record["change"], record["buckets"], record["duplicates"]
                )
            elif record["kind"] == "layout":
                for index in range(int(record["partitions"])):
                    partition = await self._partition(connection, deliveries, index)
                    if partition is not None:
                        consume(partition)
            await replaying.take(record, publishing, over, consume)

    async def _partition(
        self, connection: AbstractConnection, deliveries: HandlerScheduler, index: int
    ) -> Partition | None:
        """Partition `index` of the handler, if its queue exists (made the first time)."""
        for partition in deliveries.partitions:
            if partition.index == index:
                return partition
        if not await queue_exists(connection, deliveries.handler.queue(index)):
            return None
        partition = Partition(deliveries.handler, index, deliveries)
        deliveries.partitions.append(partition)
        self._partitions.append(partition)
        return partition

    async def _watch_depths(self, connection: AbstractConnection, over: asyncio.Event) -> None:
        """Keeps the queue depth gauge current for this worker's queues (best effort)."""
        queues = [q for h in self._handlers for q in (*h.queues, h.dead_letter_queue)]
        with contextlib.suppress(*BROKER_ERRORS):
            channel = await connection.channel(publisher_confirms=False)
            while not over.is_set():
                for name in queues:
                    queue = await channel.declare_queue(name, passive=True)
                    depth = queue.declaration_result.message_count or 0
                    metrics.QUEUE_DEPTH.labels(name).set(depth)
                await until_set(asyncio.sleep(DEPTH_INTERVAL_SECONDS), over)

    async def _keep_consuming(
        self, partition: Partition, connection: AbstractConnection, over: asyncio.Event
    ) -> None:
        """Consume a partition, reopening its channel if the broker closes it (consumer_timeout)."""
        while not over.is_set() and not partition.ended.is_set():
            try:
                await partition.consume(connection, over)
            except ChannelNotFoundEntity:
                if partition.replay_queue:
                    return  # a replay's queue, deleted once done
                log.warning("partition queue missing: run `relay topology declare`",
                            partition=partition.queue, retry_in=MISSING_RETRY_SECONDS)  # fmt: skip
                await until_set(asyncio.sleep(MISSING_RETRY_SECONDS), over)
            except (*BROKER_ERRORS, ConnectionError) as exc:
                if over.is_set():
                    return
                log.warning("partition channel lost", partition=partition.queue, error=repr(exc))
                await until_set(asyncio.sleep(REOPEN_SECONDS), over)
