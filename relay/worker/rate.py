"""A handler's delivery rate: its share of the cluster's, and how it adapts to the endpoint.

Plain code, no broker and no HTTP: clock readings in, a rate out.

**Exact across the cluster.** Every partition has exactly one active consumer (single active
consumer queues), so a worker gives the partitions it holds `rate * held / partitions` and the
workers' shares add up to `rate` whatever their number, with no coordination. Within a worker
the share is pooled across the partitions it holds (one spacing for all): a partition with
nothing queued leaves its part to its worker's other partitions, never to another worker's, so
the sum stays under the ceiling. The same goes for `max_concurrency` (`concurrency_share`). With
a skewed key distribution a worker whose partitions ran dry leaves its share unused: the cluster
delivers `rate * (partitions held by workers with something queued) / partitions`; one worker,
or backlog on every worker, delivers exactly `rate`. A worker counts a partition as held once it
has had a delivery from it on its current channel (AMQP does not tell a standby consumer from
the active one): a partition that never had a message leaves its share unused, even in a single
worker (under the ceiling, never over).

**Adaptive (AIMD).** A 429, a 503 or a rising latency is congestion: the rate is cut to
`BACKOFF` of itself (at most once per `CALM_SECONDS`: the deliveries already in flight answer
from before the cut), and creeps back additively to its ceiling (`max_rate`; when unset, the
rate observed when congestion first came, and past that the handler is unlimited again; with
too few deliveries to observe a rate, an unlimited handler stays so: parking deals with an
outage, and `Retry-After` holds the handler either way). The climb is fast (a twentieth of the
ceiling a second) up to near the rate of the last congestion, then slow (a two-hundredth) until
it passes it, then fast again: it settles just under an endpoint's limit, and still finds a
lifted limit again. Rising latency counts only while the
handler is rate-limited (`max_rate` set, or after a 429 or 503): a worker's own CPU saturation
also looks like rising latency, and must not slow an unlimited handler.
"""

from __future__ import annotations

BACKOFF = 0.75  # a congestion signal cuts the rate to this fraction
CALM_SECONDS = 1.0  # after a cut, further signals are ignored this long
FAST_STEP = 1 / 20  # of the ceiling, per second, below near the last congestion
SLOW_STEP = 1 / 200  # of the ceiling, per second, near the last congestion
NEAR = 0.95  # "near the last congestion": above this fraction of its rate
PAST = 1.0  # a rate above the last congestion's forgets it
MIN_RATE = 0.5  # deliveries per second: never cut below
LATENCY_FACTOR = 2.0  # smoothed latency this many times its baseline is congestion...
LATENCY_MARGIN = 0.25  # ...when also this many seconds above it
LATENCY_SMOOTHING = 0.3  # weight of the newest latency in the smoothed one
BASELINE_DRIFT = 0.01  # a baseline below the smoothed latency rises by this much of the gap
OBSERVED_SECONDS = 2.0  # the window over which an unlimited handler's rate is observed
OBSERVED_MIN = 10  # starts in that window, at least, for an unlimited handler to back off
LOGGED_STEP = 0.2  # a rate change of at least this fraction is logged


def rate_share(held: int, partitions: int) -> float:
    """The fraction of the handler's rate a worker holding `held` of `partitions` gives them
    (a worker delivering before it holds one, e.g. a replay's queue: one partition's)."""
    return max(1, min(held, partitions)) / partitions


def concurrency_share(held: list[int], partitions: int, ceiling: int) -> int:
    """Deliveries in flight allowed in a worker holding partitions `held` (indexes): partition i
    gets `ceiling // partitions`, plus one for the first `ceiling % partitions`, so the
    partitions' quotas add up to `ceiling` exactly (ceiling >= partitions: each gets one)."""
    base, extra = divmod(ceiling, partitions)
    indexes = {i for i in held if 0 <= i < partitions} or {partitions - 1}  # the least quota
    return sum(base + (i < extra) for i in indexes)


class AdaptiveRate:
    """The handler's rate, in deliveries per second across the cluster; `limit` is None while
    the handler is unlimited."""

    def __init__(self, ceiling: float | None) -> None:
        self.ceiling = ceiling
        self.limit: float | None = ceiling
        self._reference = ceiling or 0.0  # what the climb is a fraction of
        self._congested_at: float | None = None  # the rate when congestion last came
        self._calm_until = float("-inf")
        self._updated: float | None = None
        self._starts: list[float] = []  # unlimited: recent starts, for the observed rate
        self._smoothed: float | None = None
        self._baseline: float | None = None
        self._share = 1.0  # this worker's share when it last started a delivery
        self._logged = ceiling

    def started(self, now: float, share: float) -> None:
        """A delivery starts (unlimited: remembered, to observe the rate; `share` scales this
        worker's rate to the handler's)."""
        if self.limit is None:
            self._starts.append(now)
            if len(self._starts) > 1 and self._starts[0] < now - OBSERVED_SECONDS:
                del self._starts[: len(self._starts) // 2]
            self._share = share

    def observed(self, now: float) -> float | None:
        """The handler's rate over the last OBSERVED_SECONDS, scaled from this worker's; None
        with too few starts to tell (an outage's probes: parking deals with those)."""
        recent = [t for t in self._starts if t >= now - OBSERVED_SECONDS]
        if len(recent) < OBSERVED_MIN:
            return None
        return len(recent) / OBSERVED_SECONDS / self._share

    def congestion(self, now: float) -> bool:
        """A 429, a 503 or a rising latency: cut the rate (True) unless a cut is recent."""
        if now < self._calm_until:
            return False
        current = self.current(now)
        if current is None:
            current = self.observed(now)
            if current is None:
                return False
            self._reference = current
            self._starts.clear()
        self._congested_at = current
        self.limit = max(MIN_RATE, current * BACKOFF)
        self._calm_until = now + CALM_SECONDS
        self._updated = now
        return True

    def current(self, now: float) -> float | None:
        """The rate now, after the additive climb since the last reading."""
        if self.limit is None:
            return None
        elapsed = now - self._updated if self._updated is not None else 0.0
        self._updated = now
        limit = self.limit
        if self._congested_at is not None and limit > self._congested_at * PAST:
            self._congested_at = None  # passed it: a lifted limit, climb fast again
        near = self._congested_at is not None and limit > self._congested_at * NEAR
        limit += self._reference * (SLOW_STEP if near else FAST_STEP) * elapsed
        if self.ceiling is not None:
            self.limit = min(limit, self.ceiling)
        elif limit >= self._reference:
            self.limit = None  # back to the rate observed before: unlimited again
        else:
            self.limit = limit
        return self.limit

    def latency(self, seconds: float, now: float) -> bool:
        """A successful delivery took `seconds`: True if that made the rate back off."""
        smoothed = seconds if self._smoothed is None else (
            self._smoothed + LATENCY_SMOOTHING * (seconds - self._smoothed)
        )  # fmt: skip
        self._smoothed = smoothed
        if self._baseline is None or smoothed < self._baseline:
            self._baseline = smoothed
        else:
            self._baseline += BASELINE_DRIFT * (smoothed - self._baseline)
        rising = smoothed > max(self._baseline * LATENCY_FACTOR, self._baseline + LATENCY_MARGIN)
        return rising and self.limit is not None and self.congestion(now)

    def large_step(self) -> bool:
        """True once the rate moved by LOGGED_STEP or more since it was last logged (or
        became limited, or unlimited): log it then."""
        before, self._logged = self._logged, self.limit
        if before is None or self.limit is None:
            return before is not self.limit
        if abs(self.limit - before) >= LOGGED_STEP * before:
            return True
        self._logged = before
        return False
