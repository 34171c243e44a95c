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

import aiohttp
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from relay import metrics, topology, wire
from relay.broker import BROKER_ERRORS, exchange_exists, keep_connected, until_set
from relay.delivery import CallTarget, HttpTarget, Outcome, Target, Verdict, attempt_delivery
from relay.settings import HandlerSettings, Settings
from relay.state import State, record

log = structlog.get_logger()

DEPTH_INTERVAL_SECONDS = 10
RETRY_AFTER_MAX_SECONDS = 900  # a handler's Retry-After is honoured up to 15 minutes
STATE_PUBLISH_TIMEOUT_SECONDS = 5


class Partition:
    """One partition queue of one handler, consumed by one sequential loop.

    `failures` counts transient failures in a row; it outlives channels and deliveries, so a
    message that comes back (consumer_timeout, reconnect) finds the partition still parked, and
    `_tries` keeps the attempt count and first attempt time of the message being retried.
    The state is unknown (None) until the first outcome, which is then recorded.
    """

    def __init__(self, handler: HandlerSettings, index: int, target: Target) -> None:
        self.handler = handler
        self.queue = handler.queue(index)
        self._target = target
        self.failures = 0
        self.state: State | None = None
        self._tries: tuple[str, int, datetime] | None = None

    async def consume(
        self, connection: AbstractConnection, publisher: AbstractChannel, over: asyncio.Event
    ) -> None:
        """Deliver until `over` is set or the channel closes; unacked messages go back first."""
        channel = await connection.channel(publisher_confirms=False)
        closed = asyncio.Event()
        why: list[BaseException | None] = []

        def on_close(_: object, exc: BaseException | None = None) -> None:
            why.append(exc)
            closed.set()

        channel.close_callbacks.add(on_close)
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def receive(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(message)

        try:
            await channel.set_qos(prefetch_count=1)
            queue = await channel.get_queue(self.queue, ensure=False)
            consumer_tag = await queue.consume(receive)
            while not over.is_set():
                message = await until_set(inbox.get(), over, closed)
                if message is None:
                    break
                await self._handle(message, publisher, over, closed)
            if closed.is_set() and not over.is_set():  # e.g. consumer_timeout; reopened by caller
                raise ConnectionError(f"channel closed by the broker: {why[0]!r}")
            if not closed.is_set():
                await queue.cancel(consumer_tag)
        finally:
            # Closing, not nacking: what is still unacked goes back to the head of the queue.
            if not channel.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()

    async def _handle(
        self, message: AbstractIncomingMessage, publisher: AbstractChannel, *stop: asyncio.Event
    ) -> None:
        message_id = message.message_id or "?"
        bound = log.bind(handler=self.handler.name, partition=self.queue, message_id=message_id)
        # Delivered before (worker crash, lost connection, consumer_timeout): count those tries.
        delivered_before = (message.headers or {}).get("x-delivery-count")
        attempt = delivered_before if isinstance(delivered_before, int) else 0
        first_attempt = datetime.now(UTC)
        if self._tries is not None and self._tries[0] == message_id:  # back after a cut
            attempt, first_attempt = max(attempt, self._tries[1]), self._tries[2]
        self.failures = max(self.failures, attempt)
        while True:
            attempt += 1
            self._tries = (message_id, attempt, first_attempt)
            started = time.perf_counter()
            outcome = await attempt_delivery(self._target, message.body, message_id, attempt)
            metrics.DELIVERY_SECONDS.labels(self.handler.name).observe(
                time.perf_counter() - started
            )
            metrics.DELIVERIES.labels(self.handler.name, outcome.verdict.value).inc()
            if outcome.verdict is Verdict.SUCCESS:
                bound.info("delivered", attempt=attempt, detail=outcome.detail)
                await message.ack()
                await self._recovered(publisher)
                return
            if outcome.verdict is Verdict.PERMANENT:
                bound.warning("dead-lettered", attempt=attempt, detail=outcome.detail)
                dead = wire.dead_letter(
                    message,
                    handler=self.handler.name,
                    reason=outcome.detail,
                    status=outcome.status,
                    attempts=attempt,
                    first_attempt=first_attempt,
                )
                await publisher.default_exchange.publish(dead, self.handler.dead_letter_queue)
                await message.ack()
                await self._recovered(publisher)
                return
            self.failures += 1
            parked = self.failures >= self.handler.max_attempts
            delay = self.backoff(self.failures, outcome)
            await self._set_state(publisher, State.PARKED if parked else State.RETRYING, outcome)
            bound.warning(
                "delivery failed", attempt=attempt, detail=outcome.detail, retry_in=round(delay, 3)
            )
            if await until_set(asyncio.sleep(delay, result=True), *stop) is None:
                return  # stopping or channel lost: the message returns to the head unacked

    def backoff(self, failures: int, outcome: Outcome) -> float:
        """Exponential from backoff_initial_ms, doubling, with jitter; once parked, one probe
        per backoff_max_ms. A handler's Retry-After (up to 15 minutes) is waited at least."""
        cap = self.handler.backoff_max_ms / 1000
        if failures >= self.handler.max_attempts:
            delay = cap
        else:
            delay = min(cap, self.handler.backoff_initial_ms / 1000 * 2 ** (failures - 1))
            delay *= random.uniform(0.8, 1.0)
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, RETRY_AFTER_MAX_SECONDS))
        return delay

    async def _recovered(self, publisher: AbstractChannel) -> None:
        self.failures = 0
        self._tries = None
        if self.state is not State.LIVE:
            await self._set_state(publisher, State.LIVE, None)

    async def _set_state(
        self, publisher: AbstractChannel, state: State, outcome: Outcome | None
    ) -> None:
        if state is self.state:
            return
        detail = outcome.detail if outcome else ""
        previous = self.state.value if self.state else "unknown"
        level = log.info if state is State.LIVE else log.warning
        level("handler state", handler=self.handler.name, partition=self.queue,
              previous=previous, state=state.value, detail=detail)  # fmt: skip
        if self.state is not None:
            metrics.HANDLER_STATE.labels(self.handler.name, self.state).dec()
        metrics.HANDLER_STATE.labels(self.handler.name, state).inc()
        self.state = state
        try:  # best effort: a lost record must not hold up delivery
            async with asyncio.timeout(STATE_PUBLISH_TIMEOUT_SECONDS):
                await publisher.default_exchange.publish(
                    record(self.handler.name, self.queue, state, detail), topology.STATE_STREAM
                )
        except (*BROKER_ERRORS, TimeoutError) as exc:
            log.warning("state record not written", partition=self.queue, error=repr(exc))


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
        # Answers are read raw: a compressed answer is never inflated (see delivery._read_start).
        async with aiohttp.ClientSession(auto_decompress=False) as session:
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
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        publisher.close_callbacks.add(lambda *_: over.set())
        await self._declare(connection, publisher)
        self.ready.set()
        log.info("worker consuming", partitions=[p.queue for p in self._partitions])
        depths = asyncio.ensure_future(self._watch_depths(connection, over))
        try:
            await asyncio.gather(
                *(self._keep_consuming(p, connection, publisher, over) for p in self._partitions)
            )
        finally:
            self.ready.clear()
            depths.cancel()

    async def _declare(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        """Declare the exchange and the state stream, and the topology of each handler that has
        none yet. An existing handler's bindings and partitions are left as they are: only
        `relay topology declare` changes them, so workers of an older config restarting
        during a rolling change never undo it."""
        await topology.declare(channel, topology.ingress(self._settings) + topology.state())
        for handler in self._handlers:
            if await exchange_exists(connection, handler.exchange):
                await topology.declare(
                    channel,
                    topology.Topology(
                        queues=[topology.Queue(handler.dead_letter_queue, topology.CLASSIC)]
                    ),
                )
                continue
            await topology.declare(channel, topology.handler(self._settings, handler))
            log.info("handler topology declared", handler=handler.name,
                     partitions=handler.partitions)  # fmt: skip

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
        publisher: AbstractChannel,
        over: asyncio.Event,
    ) -> None:
        """Consume a partition, reopening its channel if the broker closes it (consumer_timeout)."""
        while not over.is_set():
            try:
                await partition.consume(connection, publisher, over)
            except BROKER_ERRORS as exc:
                if over.is_set():
                    return
                log.warning("partition channel lost", partition=partition.queue, error=repr(exc))
                await until_set(asyncio.sleep(1), over)
