"""The scheduling and retry/park decisions, as plain code: a fake clock, outcomes in, decisions
out, in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from relay.settings import HandlerSettings
from relay.wire import State
from relay.worker.delivery import Outcome, Verdict
from relay.worker.keys import KeyQueues
from relay.worker.policy import Fate, HandlerPolicy
from relay.worker.rate import AdaptiveRate, concurrency_share, rate_share

OK = Outcome(Verdict.SUCCESS, "HTTP 200", 200)
DOWN = Outcome(Verdict.TRANSIENT, "HTTP 503", 503)
GONE = Outcome(Verdict.PERMANENT, "HTTP 410", 410)


def policy(**options: object) -> HandlerPolicy:
    settings = {
        "name": "h", "events": ("envoice.#",), "bindings": ("envoice.#",), "url": "http://h/",
        "max_attempts": 3, "backoff_initial_ms": 100, "backoff_max_ms": 2000, **options,
    }  # fmt: skip
    return HandlerPolicy(HandlerSettings(**settings), jitter=lambda: 1.0)  # type: ignore[arg-type]


# --- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    rules = policy(max_attempts=100)

    delays = [rules.backoff(n, DOWN) for n in range(1, 8)]

    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_backoff_jitter_takes_off_at_most_a_fifth() -> None:
    settings = HandlerSettings(name="h", events=(), bindings=(), url="http://h/")
    rules = HandlerPolicy(settings)  # real jitter

    delays = {rules.backoff(1, DOWN) for _ in range(200)}

    assert min(delays) >= 0.4
    assert max(delays) <= 0.5
    assert len(delays) > 1


@pytest.mark.parametrize(("retry_after", "waited"), [(7.0, 7.0), (5000.0, 900.0), (0.0, 0.1)])
def test_retry_after_is_waited_at_least_and_at_most_15_minutes(
    retry_after: float, waited: float
) -> None:
    rules = policy()
    busy = Outcome(Verdict.TRANSIENT, "HTTP 429", 429, retry_after)

    decision = rules.outcome(busy, attempts=1, now=0.0)

    assert (decision.fate, decision.delay) == (Fate.RETRY, waited)


# --- outcomes -----------------------------------------------------------------------------------


def test_a_permanent_failure_is_dead_lettered_at_once() -> None:
    decision = policy().outcome(GONE, attempts=1, now=0.0)

    assert (decision.fate, decision.reason) == (Fate.DEAD_LETTER, "HTTP 410")


def test_a_message_failing_while_others_are_delivered_is_poison() -> None:
    rules = policy(max_attempts=3)
    fates = []
    for attempt in (1, 2, 3):
        fates.append(rules.outcome(DOWN, attempts=attempt, now=0.0).fate)
        rules.outcome(OK, attempts=1, now=0.0)  # another key delivered in between

    assert fates == [Fate.RETRY, Fate.RETRY, Fate.DEAD_LETTER]
    assert not rules.parked


def test_a_message_failing_with_nothing_delivered_in_between_is_an_outage_not_poison() -> None:
    rules = policy(max_attempts=3)

    fates = [rules.outcome(DOWN, attempts=n, now=0.0).fate for n in (1, 2, 3, 4)]

    assert fates == [Fate.RETRY] * 4
    assert rules.parked


def test_failures_in_a_row_across_keys_park_the_handler_and_never_dead_letter() -> None:
    rules = policy(max_attempts=3)

    fates = [rules.outcome(DOWN, attempts=n, now=0.0).fate for n in (1, 1, 1, 2, 9)]

    assert fates == [Fate.RETRY] * 5  # parked: a message that keeps failing is kept
    assert rules.parked
    assert rules.current_state() is State.PARKED


def test_a_parked_handler_sends_one_probe_per_backoff_max() -> None:
    rules = policy(max_attempts=1, backoff_max_ms=2000)
    rules.outcome(DOWN, attempts=1, now=10.0)

    assert rules.wait(10.0) == 2.0  # the first probe after backoff_max
    assert rules.wait(12.0) == 0.0
    rules.started(12.0)
    assert rules.wait(12.5) > 0  # one probe at a time
    rules.outcome(DOWN, attempts=2, now=12.5)
    assert rules.wait(12.5) == pytest.approx(1.5)  # the next one backoff_max after the last
    rules.started(14.0)
    rules.outcome(OK, attempts=3, now=14.2)
    assert not rules.parked
    assert rules.wait(14.2) == 0.0  # live: everything goes again


def test_retry_after_holds_the_whole_handler() -> None:
    rules = policy(max_attempts=10)
    busy = Outcome(Verdict.TRANSIENT, "HTTP 429", 429, 30.0)

    rules.outcome(busy, attempts=1, now=100.0)

    assert rules.wait(100.0) == 30.0
    rules.outcome(OK, attempts=1, now=101.0)  # a delivery in flight meanwhile succeeded
    assert rules.wait(101.0) == 29.0  # the hold stands
    assert rules.wait(130.0) == 0.0


def test_a_429_without_retry_after_holds_the_handler_for_the_backoff() -> None:
    rules = policy(max_attempts=10, backoff_initial_ms=500)
    busy = Outcome(Verdict.TRANSIENT, "HTTP 429", 429)

    rules.outcome(busy, attempts=2, now=0.0)

    assert rules.wait(0.0) == 1.0
    rules.outcome(DOWN, attempts=1, now=0.0)  # a 503 holds only its own message
    assert rules.wait(0.0) == 1.0


def test_max_rate_spaces_deliveries_evenly() -> None:
    rules = policy(max_rate=4.0)

    starts = []
    now = 0.0
    for _ in range(5):
        now += rules.wait(now)
        rules.started(now)
        starts.append(now)

    assert starts == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_start_a_little_late_keeps_the_pace_a_long_pause_does_not_bank_starts() -> None:
    # Given a handler at 4/s whose starts each come 0.1 s after the policy allowed them
    rules = policy(max_rate=4.0)
    starts = []
    now = 0.0
    for _ in range(5):
        now += rules.wait(now) + 0.1
        rules.started(now)
        starts.append(now)
    # Then the pace stays 4/s: each start is due 0.25 s after the one before was due
    assert starts == pytest.approx([0.1, 0.35, 0.6, 0.85, 1.1])
    # And after a pause the next one is due an interval after it, not at once several times
    rules.started(5.0)
    assert rules.wait(5.0) == 0.25


def test_starts_late_by_up_to_a_tenth_of_a_second_are_caught_up() -> None:
    # Given a handler at 40/s (every 25 ms) whose loop was busy for 80 ms
    rules = policy(max_rate=40.0)
    rules.started(0.0)
    # When it starts again at 105 ms, not 25 ms
    now = 0.105
    starts = 0
    while rules.wait(now) == 0:
        rules.started(now)
        starts += 1
    # Then it catches up the starts it was due by then (25, 50, 75, 100 ms), no more
    assert starts == 4
    assert rules.wait(now) == pytest.approx(0.02)


def test_state_is_unknown_until_the_first_outcome_then_follows_them() -> None:
    rules = policy(max_attempts=2)
    assert rules.state is None

    rules.outcome(DOWN, attempts=1, now=0.0)
    rules.retrying(+1)
    first = rules.current_state()
    rules.outcome(DOWN, attempts=2, now=0.0)
    second = rules.current_state()
    rules.outcome(OK, attempts=3, now=0.0)
    rules.retrying(-1)

    assert (first, second, rules.current_state()) == (State.RETRYING, State.PARKED, State.LIVE)


# --- keys -----------------------------------------------------------------------------------------


@dataclass
class Item:
    key: str
    n: int


def test_each_key_releases_its_next_message_only_when_the_one_before_is_done() -> None:
    keys: KeyQueues[Item] = KeyQueues()
    a1, a2, b1, a3 = Item("a", 1), Item("a", 2), Item("b", 1), Item("a", 3)

    ready = [item for item in (a1, a2, b1, a3) if keys.add(item)]

    assert ready == [a1, b1]  # every key's head at once
    assert keys.done(a1) is a2
    assert keys.done(b1) is None
    assert keys.done(a2) is a3
    assert keys.done(a3) is None
    assert len(keys) == 0


def test_only_a_keys_head_can_be_done() -> None:
    keys: KeyQueues[Item] = KeyQueues()
    first, second = Item("a", 1), Item("a", 2)
    keys.add(first)
    keys.add(second)

    with pytest.raises(ValueError, match="is not the head"):
        keys.done(second)


# --- the handler's rate: its share, and how it adapts (relay/worker/rate.py) -------------------


def test_workers_shares_of_the_rate_add_up_to_max_rate_whatever_their_number() -> None:
    # Given a handler at 40/s over 4 partitions, held 2/1/1 by three workers, or all by one
    spreads = [[2, 1, 1], [4], [3, 1]]
    for spread in spreads:
        # When each worker spaces its starts by its share
        total = 0.0
        for held in spread:
            rules = policy(max_rate=40.0, partitions=4)
            rules.share = rate_share(held, 4)
            now, starts = 0.0, 0
            while now < 10.0:
                now += rules.wait(now)
                rules.started(now)
                starts += 1
            total += starts / 10.0
        # Then the handler's rate is 40/s across them
        assert total == pytest.approx(40.0, abs=0.5), spread


def test_max_concurrency_quotas_add_up_exactly_over_the_partitions() -> None:
    # Given 10 deliveries in flight at most over 4 partitions (quotas 3, 3, 2, 2)
    # Then any split of the partitions among workers adds up to 10
    assert concurrency_share([0, 1, 2, 3], 4, 10) == 10
    assert concurrency_share([0], 4, 10) + concurrency_share([1, 2, 3], 4, 10) == 10
    assert concurrency_share([2], 4, 10) == 2
    # And a worker holding none yet (a replay's queue) gets one partition's least quota
    assert concurrency_share([], 4, 10) == 2


def test_a_429_backs_the_rate_off_once_per_calm_period_and_it_creeps_back_to_max_rate() -> None:
    # Given a handler at 60/s
    rules = policy(max_rate=60.0, max_attempts=100)
    busy = Outcome(Verdict.TRANSIENT, "HTTP 429", 429)
    # When 429s come in a burst
    rules.outcome(busy, attempts=1, now=10.0)
    rules.outcome(busy, attempts=1, now=10.2)
    # Then the rate is cut once, multiplicatively
    assert rules.rate.current(10.2) == pytest.approx(45.0 + 60 / 20 * 0.2)
    # And it climbs back additively, never beyond max_rate
    assert rules.rate.current(13.0) == pytest.approx(45.0 + 60 / 20 * 3.0)
    assert rules.rate.current(100.0) == 60.0


def test_the_climb_slows_near_the_last_limit_and_speeds_up_past_it() -> None:
    # Given a handler at 60/s cut by a 503 at 40/s
    rate = AdaptiveRate(60.0)
    rate.limit = 40.0
    rate.congestion(0.0)
    assert rate.limit == 30.0

    def climb(start: float, seconds: float) -> float | None:  # read every 10 ms, as deliveries do
        for i in range(1, round(seconds * 100) + 1):
            limit = rate.current(start + i / 100)
        return limit

    # When it climbs: fast (3/s a second) up to 95% of 40, then slow (0.3/s a second)
    assert climb(0.0, 2.0) == pytest.approx(36.0)
    assert climb(2.0, 1.0) == pytest.approx(38.0 + 0.3 * 0.33, abs=0.02)
    assert climb(3.0, 5.0) == pytest.approx(38.1 + 1.5, abs=0.03)
    # Then, once past 40 without another signal, fast again
    rate.limit = 40.1
    assert climb(8.0, 1.0) == pytest.approx(40.1 + 3.0, abs=0.03)


def test_an_unlimited_handler_backs_off_from_its_observed_rate_and_becomes_unlimited_again() -> (
    None
):
    # Given a handler with no max_rate delivering 100/s
    rules = policy(max_attempts=100)
    for i in range(300):
        rules.started(i / 100)
    assert rules.rate.limit is None
    # When a 429 comes
    rules.outcome(Outcome(Verdict.TRANSIENT, "HTTP 429", 429), attempts=1, now=3.0)
    # Then it is limited below what it observed
    assert rules.rate.limit == pytest.approx(75.0, rel=0.05)
    assert rules.rate.large_step()
    # And with no more signals it climbs back past that, unlimited again
    assert rules.rate.current(60.0) is None
    assert rules.rate.large_step()


def test_rising_latency_backs_a_limited_rate_off_but_not_an_unlimited_one() -> None:
    # Given a limited and an unlimited handler whose endpoint answers in 10 ms
    limited, unlimited = AdaptiveRate(50.0), AdaptiveRate(None)
    for i in range(50):
        assert not limited.latency(0.010, i / 10)
        assert not unlimited.latency(0.010, i / 10)
    # When the latency rises to a second
    cuts = [limited.latency(1.0, 5.0 + i / 10) for i in range(20)]
    # Then the limited one backs off (once per calm period), the unlimited one does not
    assert 1 <= sum(cuts) <= 2
    assert limited.limit is not None
    assert limited.limit < 50.0
    assert not any(unlimited.latency(1.0, 5.0 + i / 10) for i in range(20))
    assert unlimited.limit is None


def test_small_rate_changes_are_not_logged_large_ones_are() -> None:
    rate = AdaptiveRate(60.0)
    rate.congestion(0.0)  # 45/s
    assert rate.large_step()
    rate.current(1.0)  # 48/s: 7% from 45
    assert not rate.large_step()
    rate.current(5.0)  # 60/s: 33% from 45
    assert rate.large_step()
