"""A partition's part in a change of its handler's partitions, as plain bookkeeping.

`relay topology declare` moves buckets from old partitions to new ones with markers (relay/
wire.py): a partition gaining buckets first receives HOLD, and holds the messages of those
buckets that arrive after it; a partition losing buckets receives FENCE_START before the switch
of bindings and FENCE after it. A FENCE passes once every earlier message of its buckets has
its final outcome: then the old partition releases the buckets (a record in relay.state), and
the new one delivers what it held, skipping the messages that were routed to both partitions
while the bindings were switched (those seen between FENCE_START and FENCE: the duplicates).

A replay from the archive uses the same two halves at one point of a partition: REPLAY fences
what came before it (change `before`) and holds what comes after it (change `after`); the
replay queue's closing FENCE names the ids it delivered that the partitions may also hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from relay.wire import FENCE, FENCE_START, HOLD, REPLAY, Marker


class InWindow(Protocol):
    @property
    def bucket(self) -> int: ...

    @property
    def message_id(self) -> str: ...


T = TypeVar("T", bound=InWindow)


@dataclass(eq=False)
class Fence(Generic[T]):
    """A FENCE waiting for the earlier messages of its buckets to be done."""

    change: str
    buckets: frozenset[int]
    waiting: set[T]
    duplicates: set[str]  # ids of these buckets seen between FENCE_START and FENCE
    tags: list[int] = field(default_factory=list)  # the markers, acked once released


class Changes(Generic[T]):
    def __init__(self) -> None:
        # bucket -> the latest change whose HOLD this partition took in: its messages arriving
        # since wait for that change's release, and are checked against its duplicates
        self._holds: dict[int, str] = {}
        self._hold_markers: list[tuple[Marker, int]] = []
        self._collecting: dict[str, tuple[frozenset[int], set[str], int]] = {}
        self._fences: list[Fence[T]] = []

    def clear(self) -> None:
        """The channel is gone: the markers come again, with the messages."""
        self._holds.clear()
        self._hold_markers.clear()
        self._collecting.clear()
        self._fences.clear()

    def holder(self, bucket: int) -> str | None:
        """The change a message of `bucket` arriving now answers to, if any."""
        return self._holds.get(bucket)

    def arrived(self, item: T) -> None:
        for buckets, seen, _ in self._collecting.values():
            if item.bucket in buckets:
                seen.add(item.message_id)

    def marker(
        self,
        marker: Marker,
        tag: int,
        window: Iterable[T],
        released: Callable[[str, int], bool],
    ) -> tuple[list[int], Fence[T] | None]:
        """Take in a marker: the marker tags to ack now, and a fence that passed at once."""
        if marker.kind == HOLD:
            return self._hold(marker, tag, released), None
        if marker.kind == FENCE_START:
            self._collecting[marker.change] = (marker.buckets, set(), tag)
            return [], None
        if marker.kind == FENCE:
            return [], self._fence(marker.change, marker.buckets, marker.ids, window, tag)
        if marker.kind == REPLAY:  # its tag is acked once, with its hold
            passed = self._fence(marker.before, marker.buckets, frozenset(), window, None)
            return self._hold(marker, tag, released), passed
        return [], None

    def _hold(self, marker: Marker, tag: int, released: Callable[[str, int], bool]) -> list[int]:
        for bucket in marker.buckets:
            self._holds[bucket] = marker.change
        if all(released(marker.change, b) for b in marker.buckets):
            return [tag]
        self._hold_markers.append((marker, tag))
        return []

    def _fence(
        self,
        change: str,
        buckets: frozenset[int],
        ids: frozenset[str],
        window: Iterable[T],
        tag: int | None,
    ) -> Fence[T] | None:
        """A fence of what came before it: returned if it passes at once, else kept."""
        buckets, seen, start = self._collecting.pop(change, (buckets, set(), None))
        waiting = {item for item in window if item.bucket in buckets}
        tags = [t for t in (start, tag) if t is not None]
        fence = Fence(change, buckets, waiting, seen | ids, tags)
        if not waiting:
            return fence
        self._fences.append(fence)
        return None

    def done(self, item: T) -> list[Fence[T]]:
        """`item` has its final outcome: the fences that pass now."""
        passed = []
        for fence in self._fences:
            fence.waiting.discard(item)
            if not fence.waiting:
                passed.append(fence)
        self._fences = [f for f in self._fences if f.waiting]
        return passed

    def holds_released(self, change: str, released: Callable[[str, int], bool]) -> list[int]:
        """A release of `change` arrived: the tags of the HOLD markers now wholly released."""
        done = [
            (m, tag)
            for m, tag in self._hold_markers
            if m.change == change and all(released(change, b) for b in m.buckets)
        ]
        self._hold_markers = [entry for entry in self._hold_markers if entry not in done]
        return [tag for _, tag in done]
