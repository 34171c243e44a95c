"""Delivering one handler's messages in one worker process.

Partitions hand over the head message of each key (relay/worker/partition.py); here at most
`concurrency` of them are in flight at once (and at most this worker's share of
`max_concurrency`), started as the handler's policy and rate allow (relay/worker/policy.py,
relay/worker/rate.py), and each outcome is turned into an ack, a dead letter or a later retry.
The handler's state (live, retrying, parked) and rate are logged, exported and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
import structlog

from relay import metrics, tracing, wire
from relay.settings import HandlerSettings, RepeatsSettings
from relay.topology import STATE_STREAM
from relay.wire import State
from relay.worker.decided import Decided
from relay.worker.delivery import Outcome, Target, Verdict, attempt_delivery
from relay.worker.outcomes import OutcomeLog
from relay.worker.partition import Delivery, Partition
from relay.worker.policy import Fate, HandlerPolicy
from relay.worker.rate import concurrency_share, rate_share

log = structlog.get_logger()

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
# Failed messages whose tries are remembered across channel cuts, the oldest forgotten first: a
# message whose partition moves to another worker never comes back here to be settled
TRIES_REMEMBERED = 10_000

Publish = Callable[[aio_pika.Message, str], Awaitable[None]]  # (message, queue): confirmed


class HandlerScheduler:
    def __init__(self, handler: HandlerSettings, target: Target, repeats: RepeatsSettings) -> None:
        self.handler = handler
        self.policy = HandlerPolicy(handler)
        self.partitions: list[Partition] = []
        self._target = target
        self._ready: deque[Delivery] = deque()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(handler.concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Future[None]] = set()
        self._timers: dict[Delivery, asyncio.TimerHandle] = {}  # retries waiting for their time
        self._tries: dict[str, tuple[int, datetime, float]] = {}  # of messages that failed
        self._halted = False
        # Partition changes released so far: change -> (buckets, duplicates), from relay.state.
        self._releases: dict[str, tuple[set[int], set[str]]] = {}
        self._requires: dict[str, str] = {}  # a replay's fill -> its before: released together
        self._publish: Publish | None = None
        self._outcome_log = OutcomeLog(handler.outcome_log)
        self.decided = Decided(handler, repeats)
        self._dispatcher: asyncio.Task[None] | None = None
        self._log = log.bind(handler=handler.name)
        name = handler.name
        self._outcomes = {
            v: metrics.DELIVERIES.labels(name, v) for v in ("success", "transient", "permanent")
        }
        self._seconds = metrics.DELIVERY_SECONDS.labels(name)
        self._end_to_end = {
            v: metrics.END_TO_END_SECONDS.labels(name, v)
            for v in (wire.DELIVERED, wire.DEAD_LETTERED)
        }
        self._parked = metrics.PARKED_SECONDS.labels(name)
        self._parked_at = 0.0  # when the handler was last parked here (monotonic clock)
        self._rate = metrics.HANDLER_RATE.labels(name)
        self._rate.set(handler.max_rate or 0)

    # --- the partitions' side -----------------------------------------------------------------

    def ready(self, delivery: Delivery) -> None:
        """`delivery` is its key's head: deliver it as soon as the policy allows."""
        tried = self._tries.get(delivery.message_id)
        if tried is not None and not delivery.attempts:  # back after a cut: its tries go on
            delivery.attempts, delivery.first_attempt, delivery.not_before = tried
            delivery.failed = True
            self.policy.retrying(+1)
        wait = delivery.not_before - time.monotonic()
        if wait > 0:
            loop = asyncio.get_running_loop()
            self._timers[delivery] = loop.call_later(wait, self._due, delivery)
            return
        self._ready.append(delivery)
        self._wake.set()

    def _due(self, delivery: Delivery) -> None:
        del self._timers[delivery]
        delivery.not_before = 0.0
        self.ready(delivery)

    def forget(self, delivery: Delivery) -> None:
        """`delivery` no longer waits for another try (its outcome is final, or its channel
        closed)."""
        if delivery.failed:
            delivery.failed = False
            self.policy.retrying(-1)

    def release_of(self, change: str, bucket: int) -> frozenset[str] | None:
        """If `change` released `bucket`: the ids it delivered from elsewhere."""
        release = self._releases.get(change)
        if release is None or bucket not in release[0]:
            return None
        required = self._requires.get(change)
        if required is not None and self.release_of(required, bucket) is None:
            return None
        return frozenset(release[1])

    def is_released(self, change: str, bucket: int) -> bool:
        return self.release_of(change, bucket) is not None

    def require(self, change: str, required: str) -> None:
        """`change` counts as released for a bucket only once `required` has released it too."""
        self._requires[change] = required

    async def take_release(self, change: str, buckets: list[int], duplicates: list[str]) -> None:
        """A release record: `change` released `buckets` (in relay.state, from any worker)."""
        known, ids = self._releases.setdefault(change, (set(), set()))
        known.update(buckets)
        ids.update(duplicates)
        waiting = [change, *(c for c, required in self._requires.items() if required == change)]
        for partition in list(self.partitions):
            for each in waiting:
                await partition.on_release(each, frozenset(buckets))

    async def record(self, message: aio_pika.Message) -> None:
        """Append a record to relay.state, confirmed."""
        assert self._publish is not None
        await self._publish(message, STATE_STREAM)

    async def dead_letter(self, delivery: Delivery, outcome: Outcome, reason: str) -> None:
        """Publish `delivery`'s dead letter and wait for the broker's confirm."""
        assert self._publish is not None
        dead = wire.dead_letter(
            delivery.body,
            delivery.properties,
            handler=self.handler.name,
            reason=reason,
            status=outcome.status,
            attempts=delivery.attempt,
            first_attempt=delivery.first_attempt or datetime.now(UTC),
        )
        await self._publish(dead, self.handler.dead_letter_queue)

    async def record_outcome(
        self, delivery: Delivery, outcome: Outcome, dead_letter: str | None
    ) -> None:
        """Append `delivery`'s final outcome to the handler's outcome log and wait for the
        broker's confirm (`dead_letter`: why it was dead-lettered, else it was delivered)."""
        record = wire.outcome_record(
            delivery.body,
            delivery.properties,
            outcome=wire.DELIVERED if dead_letter is None else wire.DEAD_LETTERED,
            handler=self.handler.name,
            key=delivery.key,
            bucket=delivery.bucket,
            partition=delivery.queue,
            attempts=delivery.attempt,
            status=outcome.status,
            reason=dead_letter,
            at=datetime.now(UTC),
        )
        await self._outcome_log.write(record)
        self.decided.add(delivery.message_id)
        if record["received_at"] is not None and not delivery.sent_again:
            # received_at is by the ingress host's clock: skewed ahead of this one's, it reads 0
            accepted = datetime.fromisoformat(record["received_at"]).timestamp()
            self._end_to_end[record["outcome"]].observe(max(0.0, time.time() - accepted))

    # --- running ------------------------------------------------------------------------------

    def start(self, publish: Publish) -> None:
        self._publish = publish
        self._outcome_log.start(publish)
        self._halted = False
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.ensure_future(self._dispatch())

    def halt(self) -> None:
        """Start no more deliveries (stopping); those in flight go on to their outcome."""
        self._halted = True
        self._wake.set()

    async def stop(self) -> None:
        """After the partitions stopped: forget what waited, end the dispatcher."""
        self.halt()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._ready.clear()
        await self._outcome_log.stop()

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            delivery = await self._next()
            if delivery is None:
                self._slots.release()
                return
            task = asyncio.ensure_future(self._deliver(delivery))
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            self._log.error("delivery crashed", error=repr(task.exception()))

    async def _next(self) -> Delivery | None:
        """The next ready delivery, once the policy lets one start; None once halted."""
        while not self._halted:
            while self._ready and self._ready[0].stale:
                self._ready.popleft()
            wait: float | None = None
            if self._ready and self._may_start():
                now = time.monotonic()
                wait = self.policy.wait(now)
                if wait <= 0:
                    self.policy.started(now)
                    return self._ready.popleft()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
        return None

    def _may_start(self) -> bool:
        """Under this worker's share of max_concurrency (if set), with its share of the rate
        updated: both from the partitions this worker holds (relay/worker/rate.py)."""
        held = [p.index for p in self.partitions if p.active and not p.replay_queue]
        self.policy.share = rate_share(len(held), self.handler.partitions)
        ceiling = self.handler.max_concurrency
        if ceiling is None:
            return True
        return len(self._in_flight) < concurrency_share(held, self.handler.partitions, ceiling)

    async def _deliver(self, delivery: Delivery) -> None:
        with delivery.in_flight:
            delivery.attempts += 1
            if delivery.first_attempt is None:
                delivery.first_attempt = datetime.now(UTC)
            started = time.perf_counter()
            # current in this task (one per attempt) from here: its log lines carry the trace_id
            traced = tracing.attempt(self.handler.name, delivery)
            outcome = await attempt_delivery(
                self._target, delivery.body, delivery.message_id, delivery.attempt, delivery.replay
            )
            traced.ended(outcome)
            took = time.perf_counter() - started
            self._seconds.observe(took)
            self._outcomes[outcome.verdict.value].inc()
            if outcome.verdict is Verdict.SUCCESS:
                self.policy.took(took, time.monotonic())
            decision = self.policy.outcome(outcome, delivery.attempts, time.monotonic())
            self._rate_changed(outcome)
            self._logged(delivery, outcome, decision.fate, decision.delay)
            if decision.fate is Fate.RETRY:
                delivery.not_before = time.monotonic() + decision.delay
                self._remember_tries(delivery)
                if not delivery.failed:
                    delivery.failed = True
                    self.policy.retrying(+1)
                if not delivery.stale:
                    self.ready(delivery)
            else:
                self._tries.pop(delivery.message_id, None)
                dead = decision.reason if decision.fate is Fate.DEAD_LETTER else None
                await delivery.settle(outcome, dead)
            self._record_state(outcome)
            self._wake.set()  # the policy may let more start now

    def _remember_tries(self, delivery: Delivery) -> None:
        """Keep `delivery`'s tries for when it comes again after a channel cut, as the newest;
        beyond TRIES_REMEMBERED the oldest are forgotten (if one comes again, its tries count on
        from the broker's delivery count, x-delivery-count)."""
        assert delivery.first_attempt is not None
        self._tries.pop(delivery.message_id, None)
        self._tries[delivery.message_id] = (
            delivery.attempts,
            delivery.first_attempt,
            delivery.not_before,
        )
        while len(self._tries) > TRIES_REMEMBERED:
            del self._tries[next(iter(self._tries))]

    def _logged(self, delivery: Delivery, outcome: Outcome, fate: Fate, delay: float) -> None:
        fields = {
            "partition": delivery.queue,
            "message_id": delivery.message_id,
            "key": delivery.key,
            "attempt": delivery.attempt,
            "detail": outcome.detail,
        }
        if fate is Fate.DELIVERED:
            self._log.info("delivered", **fields)
        elif fate is Fate.DEAD_LETTER:
            self._log.warning("dead-lettered", **fields)
        else:
            self._log.warning("delivery failed", retry_in=round(delay, 3), **fields)

    # --- state --------------------------------------------------------------------------------

    def _rate_changed(self, outcome: Outcome) -> None:
        """Export the handler's rate; log and record it when it moved by a large step."""
        rate = self.policy.rate
        self._rate.set(rate.limit or 0)
        if not rate.large_step():
            return
        limit = None if rate.limit is None else round(rate.limit, 1)
        self._log.info("handler rate", rate=limit, ceiling=rate.ceiling, detail=outcome.detail)
        self._write_state(self.policy.state or State.LIVE, outcome.detail)

    def _record_state(self, outcome: Outcome) -> None:
        state = self.policy.current_state()
        previous = self.policy.state
        if state is previous:
            return
        self.policy.state = state
        if state is State.PARKED:
            self._parked_at = time.monotonic()
        elif previous is State.PARKED:
            self._parked.observe(time.monotonic() - self._parked_at)
        detail = "" if state is State.LIVE else outcome.detail
        level = self._log.info if state is State.LIVE else self._log.warning
        level("handler state", previous=previous.value if previous else "unknown",
              state=state.value, detail=detail)  # fmt: skip
        for each in State:
            metrics.HANDLER_STATE.labels(self.handler.name, each.value).set(each is state)
        self._write_state(state, detail)

    def _write_state(self, state: State, detail: str) -> None:
        if self._publish is not None:
            writing = asyncio.ensure_future(self._write_records(state, detail))
            self._background.add(writing)
            writing.add_done_callback(self._background.discard)

    async def _write_records(self, state: State, detail: str) -> None:
        """Best effort: a lost state record must not hold up delivery."""
        assert self._publish is not None
        for partition in self.partitions:
            if not partition.active:
                continue  # a standby here: the active worker records this partition's state
            record = wire.state_record(
                handler=self.handler.name,
                partition=partition.queue,
                state=state.value,
                detail=detail,
                worker=WORKER_ID,
                rate=self.policy.rate.limit,
            )
            try:
                await asyncio.wait_for(self._publish(record, STATE_STREAM), 5)
            except Exception as exc:
                self._log.warning("state record not written", error=repr(exc))
                return
