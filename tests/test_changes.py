"""A partition's part in a partition change, as plain bookkeeping (relay/worker/changes.py)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.wire import FENCE, FENCE_START, HOLD, Marker
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
    assert changes.released("c1", lambda c, b: b in released) == []  # 2 still held
    released.add(2)
    assert changes.released("c1", lambda c, b: b in released) == [7]
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
