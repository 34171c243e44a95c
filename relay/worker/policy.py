"""When a handler may be called, and what becomes of a message after each outcome.

Plain code, no broker and no HTTP: it takes a clock reading and outcomes, and returns decisions.
One `HandlerPolicy` serves one handler in one worker process, across its partitions.

- Transient failures retry the message with exponential backoff (from `backoff_initial_ms`,
  doubling, capped at `backoff_max_ms`, less up to 20% jitter) while its key waits.
- A handler outage, `max_attempts` transient failures in a row across the handler with no
  success in between, parks the handler: nothing is sent but one probe every
  `backoff_max_ms`; the first success makes it live again.
- A poison message, one that fails transiently `max_attempts` times while the handler delivers
  other messages, is dead-lettered; so is every permanent failure.
- `Retry-After` (up to 15 minutes), and a 429 without one (for the message's backoff), hold the
  whole handler, not only the message's key.
- The handler's rate (relay/worker/rate.py: `max_rate`, this worker's share of it, backed off
  on 429, 503 and rising latency) spaces deliveries evenly: at most that many starts a second.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from relay.settings import HandlerSettings
from relay.wire import State
from relay.worker.delivery import Outcome, Verdict
from relay.worker.rate import AdaptiveRate

RETRY_AFTER_MAX_SECONDS = 900.0
TOO_MANY_REQUESTS = 429
CATCH_UP_SECONDS = 0.1  # a rate's starts this late are caught up (a burst of at most this long)
CONGESTED = frozenset({TOO_MANY_REQUESTS, 503})  # statuses that back the rate off


class Fate(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Decision:
    fate: Fate
    delay: float = 0.0  # RETRY: seconds before the message may be tried again
    reason: str = ""  # DEAD_LETTER: why


class HandlerPolicy:
    """Decides for one handler: may a delivery start now, and what follows each outcome."""

    def __init__(
        self,
        handler: HandlerSettings,
        *,
        jitter: Callable[[], float] = lambda: random.uniform(0.8, 1.0),
    ) -> None:
        self._handler = handler
        self._jitter = jitter
        self._cap = handler.backoff_max_ms / 1000
        self.rate = AdaptiveRate(handler.max_rate)
        self.share = 1.0  # of the handler's rate, this worker's (the partitions it holds)
        self.streak = 0  # transient failures in a row across the handler
        self.parked = False
        self.state: State | None = None  # unknown until the first outcome
        self._retrying = 0  # messages that failed and wait for another try
        self._probing = False  # parked, and the probe is in flight
        self._probe_at = 0.0  # parked: when the next probe may start
        self._held_until = 0.0  # a Retry-After holds the handler until then
        self._next_start = 0.0  # a limited rate: the earliest next start

    def wait(self, now: float) -> float:
        """Seconds until a delivery may start; 0 when one may start now."""
        if self.parked and self._probing:
            return self._cap  # one probe at a time; its outcome wakes the others
        start = max(self._held_until, self._next_start, self._probe_at if self.parked else 0)
        return max(0.0, start - now)

    def started(self, now: float) -> None:
        """A delivery starts now (after `wait` said 0)."""
        if self.parked:
            self._probing = True
            self._probe_at = now + self._cap
        self.rate.started(now, self.share)
        limit = self.rate.current(now)
        if limit is not None:
            # Started late by less than CATCH_UP_SECONDS (the event loop's timers run late, a
            # busy loop later still): keep the pace, else the rate would fall short by that
            # lateness on every start; later than that (idle), start the pace anew
            interval = 1 / (limit * self.share)
            on_time = now - self._next_start < max(interval, CATCH_UP_SECONDS)
            self._next_start = (self._next_start if on_time else now) + interval

    def took(self, seconds: float, now: float) -> None:
        """A delivery succeeded after `seconds`: a rising latency backs the rate off."""
        self.rate.latency(seconds, now)

    def outcome(self, outcome: Outcome, attempts: int, now: float) -> Decision:
        """What becomes of a message whose attempt number `attempts` (this process's tries,
        this one included) ended with `outcome`."""
        self._probing = False
        if outcome.verdict is Verdict.SUCCESS:
            self.streak = 0
            self.parked = False
            return Decision(Fate.DELIVERED)
        if outcome.verdict is Verdict.PERMANENT:
            return Decision(Fate.DEAD_LETTER, reason=outcome.detail)
        self.streak += 1
        if outcome.status in CONGESTED:
            self.rate.congestion(now)
        delay = self.backoff(attempts, outcome)
        if outcome.retry_after is not None or outcome.status == TOO_MANY_REQUESTS:
            self._held_until = max(self._held_until, now + delay)
        if self.streak >= self._handler.max_attempts:
            if not self.parked:
                self.parked = True
                self._probe_at = now + self._cap
        elif attempts >= self._handler.max_attempts:  # others were delivered meanwhile
            return Decision(
                Fate.DEAD_LETTER,
                reason=f"failed {attempts} times in a row, last: {outcome.detail}",
            )
        return Decision(Fate.RETRY, delay=delay)

    def backoff(self, attempts: int, outcome: Outcome) -> float:
        """Exponential from backoff_initial_ms, doubling, capped at backoff_max_ms, with jitter;
        a handler's Retry-After (up to 15 minutes) is waited at least."""
        base = self._handler.backoff_initial_ms / 1000 * 2.0 ** (attempts - 1)
        delay = min(self._cap, base) * self._jitter()
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, RETRY_AFTER_MAX_SECONDS))
        return delay

    def retrying(self, change: int) -> None:
        """Count messages waiting for another try (+1 when one starts waiting, -1 when done)."""
        self._retrying += change

    def current_state(self) -> State:
        if self.parked:
            return State.PARKED
        return State.RETRYING if self._retrying or self.streak else State.LIVE
