"""The ledger the fault tests judge by: what it calls lost, reordered, duplicated, late."""

from __future__ import annotations

from tests.processes import Ledger


def ledger() -> Ledger:
    accepted = Ledger()
    for key, message_id in [("k1", "a"), ("k1", "b"), ("k1", "c"), ("k2", "x"), ("k2", "y")]:
        accepted.accept(key, message_id)
    return accepted


def test_everything_once_in_order_is_clean() -> None:
    tally = ledger().check([("k1", "a"), ("k2", "x"), ("k1", "b"), ("k2", "y"), ("k1", "c")])

    assert tally.ok
    assert (tally.delivered, tally.lost, tally.reordered, tally.duplicates) == (5, 0, 0, 0)
    assert tally.late_repeats == 0


def test_lost_and_reordered_are_counted_per_webhook_and_per_key() -> None:
    tally = ledger().check([("k1", "b"), ("k1", "a"), ("k2", "x")])  # c and y never came

    assert not tally.ok
    assert (tally.lost, tally.reordered) == (2, 1)  # k1 went b, a


def test_a_repeat_after_a_later_webhook_of_its_key_is_a_late_repeat_not_a_reordering() -> None:
    # a, b delivered, then a again (its ack was lost): first deliveries are in order
    tally = ledger().check(
        [("k1", "a"), ("k1", "b"), ("k1", "a"), ("k1", "c"), ("k2", "x"), ("k2", "x"), ("k2", "y")]
    )

    assert tally.ok
    assert tally.duplicates == 2  # a and x twice
    assert tally.late_repeats == 1  # a came back after b; x's repeat came before y: not late
    assert "late repeats: a" in tally.problems


def test_deliveries_never_accepted_are_left_out() -> None:
    tally = ledger().check(
        [("k1", "a"), ("k1", "zz"), ("k1", "b"), ("k1", "c"), ("k2", "x"), ("k2", "y")]
    )

    assert tally.ok
    assert (tally.delivered, tally.duplicates) == (5, 0)
