"""SeenIds: ids within the horizon are seen, others not, through growth, expiry and eviction.

Most tests use a horizon of 256 s, so that a time slot is one second: an id added at `at` is
seen while `now` is below `int(at) + 257`.
"""

from __future__ import annotations

import math
import random

import pytest

from relay.seen import SLOTS_PER_HORIZON, SeenIds, digest

HORIZON = 256.0  # one slot a second


def random_digests(rng: random.Random, count: int) -> list[int]:
    return [rng.getrandbits(64) for _ in range(count)]


def test_digest_is_blake2b_of_source_nul_id_read_big_endian() -> None:
    assert digest("envoice", "evt_1") == 0x7BC709BADBC2E843
    assert digest("envoice", "evt_1") != digest("github", "evt_1")
    assert digest("envoice", "evt_1") != digest("envoice", "evt_2")
    assert 0 <= digest("stripe", "") < 2**64


def test_an_added_digest_is_seen_and_others_are_not() -> None:
    seen = SeenIds(HORIZON)
    added, never = random_digests(random.Random(1), 2)

    seen.add(added, at=1000.0)

    assert seen.seen(added, now=1000.0)
    assert not seen.seen(never, now=1000.0)
    assert len(seen) == 1


def test_nothing_is_seen_before_the_first_add() -> None:
    seen = SeenIds(HORIZON)

    assert not seen.seen(12345, now=0.0)
    assert len(seen) == 0


def test_an_id_is_seen_for_the_horizon_rounded_up_to_its_slot() -> None:
    seen = SeenIds(HORIZON)

    seen.add(7, at=1000.5)

    assert seen.seen(7, now=1000.5 + HORIZON)
    assert seen.seen(7, now=1256.99)
    assert not seen.seen(7, now=1257.0)
    assert not seen.seen(7, now=5000.0)


def test_the_horizon_counts_back_from_the_latest_at_added_as_well_as_from_now() -> None:
    seen = SeenIds(HORIZON)

    seen.add(1, at=0.0)
    seen.add(2, at=1000.0)

    assert not seen.seen(1, now=10.0)
    assert seen.seen(2, now=10.0)  # an `at` after `now`: another clock, a little ahead
    assert len(seen) == 1


def test_an_add_already_beyond_the_horizon_is_not_kept() -> None:
    seen = SeenIds(HORIZON)
    seen.add(1, at=1000.0)

    seen.add(2, at=1000.0 - 2 * HORIZON)

    assert not seen.seen(2, now=1000.0)
    assert len(seen) == 1


def test_of_two_times_for_one_id_the_later_is_kept_whatever_their_order() -> None:
    seen = SeenIds(HORIZON)

    seen.add(1, at=500.0)
    seen.add(1, at=400.0)
    seen.add(2, at=400.0)
    seen.add(2, at=500.0)

    for d in (1, 2):
        assert seen.seen(d, now=756.0), d
        assert not seen.seen(d, now=757.0), d
    assert len(seen) == 2


def test_an_expired_id_added_again_is_seen_again_and_counted_once() -> None:
    seen = SeenIds(HORIZON)
    seen.add(1, at=0.0)
    seen.add(2, at=1000.0)

    seen.add(1, at=1001.0)

    assert seen.seen(1, now=1001.0)
    assert len(seen) == 2


def test_digest_zero_is_kept_though_zero_marks_an_empty_cell() -> None:
    seen = SeenIds(HORIZON)
    seen.add(5, at=0.0)
    assert not seen.seen(0, now=0.0)

    seen.add(0, at=0.0)

    assert seen.seen(0, now=0.0)
    assert len(seen) == 2


def test_max_ids_forgets_the_oldest_slots_whole() -> None:
    seen = SeenIds(HORIZON, max_ids=10)
    by_second = {t: [100 * t + k for k in range(4)] for t in (0, 1, 2)}

    for t, digests in by_second.items():
        for d in digests:
            seen.add(d, at=float(t))

    assert len(seen) == 8
    assert not any(seen.seen(d, now=2.0) for d in by_second[0])
    assert all(seen.seen(d, now=2.0) for d in by_second[1] + by_second[2])


def test_max_ids_never_forgets_the_newest_slot() -> None:
    seen = SeenIds(HORIZON, max_ids=3)

    for d in range(1, 6):
        seen.add(d, at=10.0)

    assert len(seen) == 5
    assert all(seen.seen(d, now=10.0) for d in range(1, 6))


def test_max_ids_keeps_the_table_bounded() -> None:
    seen = SeenIds(HORIZON, max_ids=1000)
    rng = random.Random(2)

    for n, d in enumerate(random_digests(rng, 50_000)):
        seen.add(d, at=n / 100)  # 100 ids a slot

    assert 900 <= len(seen) <= 1000
    assert seen.memory_bytes() <= 25 * 1000


def test_growth_through_many_rehashes_keeps_every_live_id() -> None:
    seen = SeenIds(30 * 86400.0)
    rng = random.Random(3)
    added = random_digests(rng, 200_000)

    for n, d in enumerate(added):
        seen.add(d, at=1.7e9 + n / 100)

    now = 1.7e9 + 2000.0
    assert all(seen.seen(d, now) for d in added)
    assert not any(seen.seen(d, now) for d in random_digests(rng, 20_000))
    assert len(seen) == len(added)
    assert 12 * len(added) <= seen.memory_bytes() <= 22 * len(added)


def test_rehash_drops_the_expired_so_a_steady_stream_stays_small() -> None:
    seen = SeenIds(HORIZON)
    rng = random.Random(4)
    per_horizon = 20_000

    stream = random_digests(rng, 10 * per_horizon)
    for n, d in enumerate(stream):
        seen.add(d, at=n * HORIZON / per_horizon)

    now = (len(stream) - 1) * HORIZON / per_horizon
    assert all(seen.seen(d, now) for d in stream[-per_horizon:])
    assert not any(seen.seen(d, now) for d in stream[: -2 * per_horizon])
    assert per_horizon <= len(seen) <= per_horizon * (SLOTS_PER_HORIZON + 1) / SLOTS_PER_HORIZON
    assert seen.memory_bytes() <= 22 * len(seen)


def test_a_clock_running_far_past_the_slots_a_cell_can_hold_still_answers() -> None:
    seen = SeenIds(HORIZON)
    rng = random.Random(5)
    added: list[tuple[int, float]] = []

    for n, d in enumerate(random_digests(rng, 3000)):
        at = n * 100.0  # 300,000 slots: past 65,535 several times
        seen.add(d, at)
        added.append((d, at))

    last = added[-1][1]
    assert all(seen.seen(d, last) for d, at in added if at > last - HORIZON)
    assert not any(seen.seen(d, last) for d, at in added if at < last - 2 * HORIZON)


def model_seen(times: dict[int, float], clock: int, d: int, now: float) -> bool:
    """The reference: seen when the id's latest slot is within the horizon of `now` or of
    the latest `at` added, whichever is later."""
    return d in times and math.floor(times[d]) >= max(clock, math.floor(now)) - SLOTS_PER_HORIZON


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_answer_as_a_dict_of_latest_times(seed: int) -> None:
    rng = random.Random(seed)
    pool = [*random_digests(rng, 300), 0, 1]  # 0 and 1 share a cell: one id, as documented
    seen = SeenIds(HORIZON)
    times: dict[int, float] = {}
    clock = -(2**62)
    t = 0.0

    for _ in range(20_000):
        t += rng.expovariate(1 / 3)  # a clock crossing about 80 horizons, with jumps
        d = rng.choice(pool)
        key = d or 1
        if rng.random() < 0.5:
            at = t - rng.uniform(0, 1.5 * HORIZON)  # out of order, some already too old
            seen.add(d, at)
            times[key] = max(times.get(key, at), at)
            clock = max(clock, math.floor(at))
        else:
            now = t + rng.uniform(-2 * HORIZON, HORIZON)
            assert seen.seen(d, now) == model_seen(times, clock, key, now)
        live = sum(1 for at in times.values() if math.floor(at) >= clock - SLOTS_PER_HORIZON)
        assert len(seen) == live


@pytest.mark.parametrize("seed", range(3))
def test_random_operations_under_max_ids_never_see_what_was_not_live(seed: int) -> None:
    rng = random.Random(seed)
    pool = random_digests(rng, 500)
    seen = SeenIds(HORIZON, max_ids=100)
    times: dict[int, float] = {}
    clock = -(2**62)
    t = 0.0

    for _ in range(20_000):
        t += rng.expovariate(1 / 0.2)
        d = rng.choice(pool)
        at = t - rng.uniform(0, 20.0)
        seen.add(d, at)
        times[d] = max(times.get(d, at), at)
        clock = max(clock, math.floor(at))
        probe = rng.choice(pool)
        assert not seen.seen(probe, t) or model_seen(times, clock, probe, t)
        if math.floor(at) == clock:
            assert seen.seen(d, t)  # the newest slot is never forgotten
        newest = sum(1 for at in times.values() if math.floor(at) == clock)
        assert len(seen) <= max(100, newest)


@pytest.mark.parametrize(
    ("horizon", "max_ids"), [(0.0, None), (-1.0, None), (float("nan"), None), (60.0, 0)]
)
def test_a_horizon_or_max_ids_that_holds_nothing_is_refused(
    horizon: float, max_ids: int | None
) -> None:
    with pytest.raises(ValueError, match="must be"):
        SeenIds(horizon, max_ids=max_ids)
