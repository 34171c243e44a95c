"""A partition's part in a partition change, as plain bookkeeping (relay/worker/changes.py)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.wire import FENCE, FENCE_START, HOLD, REPLAY, Marker
from relay.worker.changes import Changes


@dataclass(eq=False)
class Item:
    bucket: int
    message_id: str


def marker(kind: str, *buckets: int) -> Marker:
    return Marker(kind, "c1", frozenset(buckets))


def never(change: str, bucket: int) -> bool:
    return False


def test_a_hold_marks_the_buckets_and_is_acked_once_they_are_released() -> None:
    changes: Changes[Item] = Changes()
    released: set[int] = set()

    acks, passed = changes.marker(marker(HOLD, 1, 2), 7, [], never)

    assert (acks, passed) == ([], None)
    assert (changes.holder(1), changes.holder(2), changes.holder(3)) == ("c1", "c1", None)
    released.add(1)
    assert changes.holds_released("c1", lambda c, b: b in released) == []  # 2 still held
    released.add(2)
    assert changes.holds_released("c1", lambda c, b: b in released) == [7]
    assert changes.holder(1) == "c1"  # later arrivals are still checked against duplicates


def test_a_hold_already_released_is_acked_at_once() -> None:
    changes: Changes[Item] = Changes()

    acks, _ = changes.marker(marker(HOLD, 1), 7, [], lambda c, b: True)

    assert acks == [7]


def test_a_fence_passes_when_the_earlier_messages_of_its_buckets_are_done() -> None:
    changes: Changes[Item] = Changes()
    before, other = Item(1, "a"), Item(2, "b")
    changes.marker(marker(FENCE_START, 1), 3, [], never)
    routed_twice = Item(1, "c")
    changes.arrived(routed_twice)

    _, passed = changes.marker(marker(FENCE, 1), 4, [before, other, routed_twice], never)

    assert passed is None
    assert changes.done(other) == []  # not of the fence's buckets
    assert changes.done(before) == []
    [fence] = changes.done(routed_twice)
    assert fence.duplicates == {"c"}
    assert fence.tags == [3, 4]  # both markers acked once released


def test_a_fence_with_nothing_before_it_passes_at_once() -> None:
    changes: Changes[Item] = Changes()

    _, passed = changes.marker(marker(FENCE, 5), 4, [Item(6, "x")], never)

    assert passed is not None
    assert (passed.buckets, passed.duplicates, passed.tags) == (frozenset({5}), set(), [4])


# --- replays ---------------------------------------------------------------------------------


def replay_marker(*buckets: int) -> Marker:
    return Marker(REPLAY, "r.after", frozenset(buckets), before="r.before")


def test_a_replay_marker_fences_what_came_before_and_holds_what_comes_after() -> None:
    changes: Changes[Item] = Changes()
    waiting, elsewhere = Item(1, "a"), Item(2, "b")

    acks, passed = changes.marker(replay_marker(1), 9, [waiting, elsewhere], never)

    # the fence waits for the earlier message of its bucket, and acks no marker itself
    assert (acks, passed) == ([], None)
    [fence] = changes.done(waiting)
    assert (fence.change, fence.buckets, fence.tags) == ("r.before", frozenset({1}), [])
    # what arrives after it is held by the replay's `after` change
    assert (changes.holder(1), changes.holder(2)) == ("r.after", None)
    # and the marker is acked once, when `after` is released
    assert changes.holds_released("r.after", lambda c, b: c == "r.after") == [9]


def test_a_replay_marker_with_nothing_before_it_fences_at_once() -> None:
    changes: Changes[Item] = Changes()

    acks, passed = changes.marker(replay_marker(3, 4), 9, [Item(5, "x")], never)

    assert acks == []
    assert passed is not None
    assert (passed.change, passed.buckets) == ("r.before", frozenset({3, 4}))


def test_a_replayed_marker_whose_replay_is_over_is_acked_at_once() -> None:
    changes: Changes[Item] = Changes()

    acks, _ = changes.marker(replay_marker(1), 9, [], lambda c, b: True)

    assert acks == [9]


def test_a_fence_names_the_ids_its_marker_lists_as_delivered_elsewhere() -> None:
    changes: Changes[Item] = Changes()
    fence_marker = Marker(FENCE, "r.after", frozenset({1}), ids=frozenset({"x", "y"}))

    _, passed = changes.marker(fence_marker, 4, [], never)

    assert passed is not None
    assert passed.duplicates == {"x", "y"}
