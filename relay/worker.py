"""The worker: consumes handlers' partitions and delivers each partition strictly in order.

Order within a partition rests on three rules (RABBITMQ.md):
- prefetch 1 and one sequential loop per partition, so deliveries never overlap;
- a transient failure is retried in place, holding the message: it is never nacked with
  requeue, which on a quorum queue would send it to the back;
- whatever is left unacked is returned by closing the channel, which puts it back at the head.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from datetime import UTC, datetime

import aio_pika
import aiohttp
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from relay import metrics, topology
from relay.broker import BROKER_ERRORS, keep_connected, until_set
from relay.delivery import CallTarget, HttpTarget, Outcome, Target, Verdict
from relay.settings import HandlerSettings, Settings

log = structlog.get_logger()

DEPTH_INTERVAL_SECONDS = 10
RETRY_AFTER_MAX_SECONDS = 900  # a handler's Retry-After is honoured up to 15 minutes


class Partition:
    """One partition queue of one handler, consumed by one sequential loop."""

    def __init__(self, handler: HandlerSettings, index: int, target: Target) -> None:
        self.handler = handler
        self.queue = handler.queue(index)
        self._target = target
        self.state = "live"

    async def consume(
        self, connection: AbstractConnection, dead_letters: AbstractChannel, done: asyncio.Event
    ) -> None:
        """Deliver until `done` is set or the channel closes; unacked messages go back first."""
        channel = await connection.channel(publisher_confirms=False)
        closed = asyncio.Event()
        channel.close_callbacks.add(lambda *_: closed.set())
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def receive(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(message)

        try:
            await channel.set_qos(prefetch_count=1)
            queue = await channel.get_queue(self.queue, ensure=False)
            consumer_tag = await queue.consume(receive)
            while not done.is_set():
                message = await until_set(inbox.get(), done, closed)
                if message is None:
                    break
                await self._handle(message, dead_letters, done)
            if not closed.is_set():
                await queue.cancel(consumer_tag)
        finally:
            # Closing, not nacking: what is still unacked goes back to the head of the queue.
            if not channel.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()

    async def _handle(
        self, message: AbstractIncomingMessage, dead_letters: AbstractChannel, done: asyncio.Event
    ) -> None:
        message_id = message.message_id or "?"
        bound = log.bind(handler=self.handler.name, partition=self.queue, message_id=message_id)
        first_attempt = datetime.now(UTC)
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            outcome = await self._target.deliver(message.body, message_id, attempt)
            metrics.DELIVERY_SECONDS.labels(self.handler.name).observe(
                time.perf_counter() - started
            )
            metrics.DELIVERIES.labels(self.handler.name, outcome.verdict.value).inc()
            if outcome.verdict is Verdict.SUCCESS:
                bound.info("delivered", attempt=attempt, detail=outcome.detail)
                self._set_state("live")
                await message.ack()
                return
            if outcome.verdict is Verdict.PERMANENT:
                bound.warning("dead-lettered", attempt=attempt, detail=outcome.detail)
                await self._dead_letter(message, outcome, attempt, first_attempt, dead_letters)
                await message.ack()
                return
            delay = self.backoff(attempt, outcome)
            self._set_state("retrying" if attempt < self.handler.max_attempts else "parked")
            bound.warning(
                "delivery failed", attempt=attempt, detail=outcome.detail, retry_in=round(delay, 3)
            )
            if await until_set(asyncio.sleep(delay, result=True), done) is None:
                return  # stopping: the message stays unacked and returns to the head

    def backoff(self, attempt: int, outcome: Outcome) -> float:
        """Exponential from backoff_initial_ms, doubling, capped at backoff_max_ms, with jitter;
        a handler's Retry-After (up to RETRY_AFTER_MAX_SECONDS) is waited at least."""
        cap = self.handler.backoff_max_ms / 1000
        base: float = min(cap, self.handler.backoff_initial_ms / 1000 * 2 ** (attempt - 1))
        delay = base * random.uniform(0.8, 1.0)
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, RETRY_AFTER_MAX_SECONDS))
        return delay

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        outcome: Outcome,
        attempts: int,
        first_attempt: datetime,
        channel: AbstractChannel,
    ) -> None:
        headers = {
            **(message.headers or {}),
            "x-relay-handler": self.handler.name,
            "x-relay-reason": outcome.detail,
            "x-relay-status": outcome.status or 0,
            "x-relay-attempts": attempts,
            "x-relay-first-attempt": first_attempt.isoformat(),
            "x-relay-last-attempt": datetime.now(UTC).isoformat(),
        }
        dead = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            timestamp=message.timestamp,
        )
        await channel.default_exchange.publish(dead, self.handler.dead_letter_queue)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("partition state", partition=self.queue, handler=self.handler.name,
                     previous=self.state, state=state)  # fmt: skip
            self.state = state


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
        self.ready = asyncio.Event()  # set while consuming

    def stop(self) -> None:
        """Stop taking deliveries; in-flight ones finish or return to the head of their queue."""
        self._stopping.set()
        if self._over is not None:
            self._over.set()

    async def async_run(self) -> None:
        """Consume until `stop()`, reconnecting whenever the broker connection drops."""
        async with aiohttp.ClientSession() as session:
            targets: dict[str, Target] = {
                h.name: HttpTarget(h, session) for h in self._handlers if h.url
            }
            targets.update(self._targets)
            self._partitions = [
                Partition(h, i, targets[h.name])
                for h in self._handlers
                for i in range(h.partitions)
            ]
            await keep_connected(
                self._settings.broker.url, self._session, what="worker", until=self._stopping
            )

    async def _session(self, connection: AbstractConnection, over: asyncio.Event) -> None:
        self._over = over
        if self._stopping.is_set():
            return
        dead_letters = await connection.channel(publisher_confirms=True)
        dead_letters.close_callbacks.add(lambda *_: over.set())
        await topology.declare(dead_letters, topology.describe(self._settings, self._handlers))
        self.ready.set()
        log.info("worker consuming", partitions=[p.queue for p in self._partitions])
        depths = asyncio.ensure_future(self._watch_depths(connection, over))
        try:
            await asyncio.gather(
                *(self._keep_consuming(p, connection, dead_letters, over) for p in self._partitions)
            )
        finally:
            self.ready.clear()
            depths.cancel()

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
        self,
        partition: Partition,
        connection: AbstractConnection,
        dead_letters: AbstractChannel,
        over: asyncio.Event,
    ) -> None:
        """Consume a partition, reopening its channel if the broker closes it (consumer_timeout)."""
        while not over.is_set():
            try:
                await partition.consume(connection, dead_letters, over)
            except BROKER_ERRORS as exc:
                if over.is_set():
                    return
                log.warning("partition channel lost", partition=partition.queue, error=repr(exc))
                await until_set(asyncio.sleep(1), over)
