"""Message ids seen within a horizon: a compact, bounded set of 64-bit digests with times.

An id is kept as `digest(source, message_id)` in an open-addressing table (linear probing) of
two `array.array`s: the digests ('Q'; 0 marks an empty cell, so a digest of 0 is kept as 1)
and the coarse time slot of each ('H'). A digest's first cell is `digest * cells >> 64`, which
keeps the table in digest order but for the probes: a rehash reads the old table in order and
writes the new one nearly in order, three times faster than with `digest % cells`.

Time is counted in slots of horizon/256. An id added at `at` is seen until the slot of `at`
falls out of the horizon: for the horizon rounded up to a slot, at most horizon/256 longer.
The horizon is counted back from `now` or from the latest `at` added, whichever is later; an
`at` after `now` (another replica's clock, a little ahead) counts as seen. With `max_ids`,
the oldest slots are forgotten whole while more than `max_ids` ids are live, the newest slot
never: a burst within one slot may exceed `max_ids` by that slot's ids.

Forgetting is lazy: an expired cell stays in place (the probe sequences through it stay
intact) and is reused by an insert only after a lookup of the inserted digest failed. When the
cells in use, live or expired, reach 7/10 of the table, a rehash drops the expired ones and
sizes the table for 1.5 times the live ids: 7/15 to 7/10 full, 14-21 bytes an id (about 21
in a steady stream, where the expired cells fill what growth would). A rehash pauses its
`add` for the whole table, about 0.25 s a million ids, and holds both tables meanwhile. Not
thread-safe: one event loop.

Measured on this machine (CPython 3.11, `python -m tests.bench.seen`, CPU time, medians of 3
runs, ids added at 100 a second under a 30-day horizon): 1M ids take 16.0 MiB of arrays
(16.8 bytes an id; RSS +20.5 MiB), 10M ids 182.5 MiB (19.1 bytes an id; RSS +182.5 MiB);
`add` 1.4 µs at 1M and 1.8 µs at 10M (rehashes included), `seen` 0.7 µs at 1M and 0.9 µs at
10M (hit or miss); a rehash of the full table 0.23 s at 1M, 2.4 s at 10M; `digest` 0.5 µs.
"""

from __future__ import annotations

import hashlib
from array import array

SLOTS_PER_HORIZON = 256
LOAD = 0.7  # rehash when cells in use (live or expired) would exceed this share of the table
GROWTH = 1.5  # a rehash sizes the table for this many times the live ids at LOAD
MIN_CELLS = 64
_MAX_SLOT = 0xFFFF  # the largest slot an 'H' cell holds, counted from the table's base
_BEFORE_ALL = -(1 << 62)  # the clock before the first add


def digest(source: str, message_id: str) -> int:
    """The id's 64-bit digest: blake2b (8 bytes) of `source NUL message_id` in UTF-8, read
    big-endian; the same in every process and on every machine."""
    data = f"{source}\x00{message_id}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class SeenIds:
    """Digests added with a time, answering whether one was added within the horizon."""

    def __init__(self, horizon_seconds: float, max_ids: int | None = None) -> None:
        if not horizon_seconds > 0:
            raise ValueError(f"horizon_seconds must be positive, not {horizon_seconds!r}")
        if max_ids is not None and max_ids < 1:
            raise ValueError(f"max_ids must be at least 1, not {max_ids!r}")
        self._width = horizon_seconds / SLOTS_PER_HORIZON
        self._max_ids = max_ids
        self._keys = array("Q", [0]) * MIN_CELLS
        self._slots = array("H", [0]) * MIN_CELLS
        self._used = 0  # cells holding a digest, live or expired
        self._limit = int(MIN_CELLS * LOAD)
        self._live = 0
        self._per_slot: dict[int, int] = {}  # live ids of each slot from the floor on
        # Slots are absolute (unix time // width); a cell holds its slot minus the base.
        self._base = 0
        self._clock = _BEFORE_ALL  # the slot of the latest `at` added
        # Set by the first add:
        self._evicted_below = 0  # max_ids forgot every slot below this one
        self._floor = 0  # the oldest live slot: from the clock, the horizon and max_ids
        self._floor_cell = 0  # the floor minus the base, as cells hold it

    def __len__(self) -> int:
        """The ids live at the latest `at` added (exact, not counting a later `now`)."""
        return self._live

    def memory_bytes(self) -> int:
        """Bytes of the two arrays (the table), not of the few hundred slot counters."""
        return len(self._keys) * 8 + len(self._slots) * 2

    def seen(self, digest: int, now: float) -> bool:
        """True when the digest was added with an `at` within the horizon before `now`."""
        oldest = max(self._floor, int(now // self._width) - SLOTS_PER_HORIZON) - self._base
        keys = self._keys
        cells = len(keys)
        digest = digest or 1
        i = digest * cells >> 64
        while True:
            key = keys[i]
            if key == digest:
                return self._slots[i] >= oldest
            if not key:
                return False
            i += 1
            if i == cells:
                i = 0

    def add(self, digest: int, at: float) -> None:
        """Remember the digest as seen at `at` (unix seconds); of two times, the later one."""
        slot = int(at // self._width)
        if slot > self._clock:
            self._advance(slot)
        if slot < self._floor:
            return  # already forgotten
        digest = digest or 1
        cell_slot = slot - self._base
        keys, slots, floor_cell = self._keys, self._slots, self._floor_cell
        cells = len(keys)
        i = digest * cells >> 64
        reusable = -1
        while True:
            key = keys[i]
            if key == digest:
                held = slots[i]
                if held < floor_cell:
                    slots[i] = cell_slot  # expired: added anew
                    break
                if cell_slot > held:
                    slots[i] = cell_slot
                    self._per_slot[held + self._base] -= 1
                    self._per_slot[slot] = self._per_slot.get(slot, 0) + 1
                return
            if not key:
                if reusable >= 0:
                    i = reusable
                elif self._used >= self._limit:
                    self._rehash()
                    self._insert_new(digest, slot - self._base)
                    self._count_new(slot)
                    return
                else:
                    self._used += 1
                keys[i] = digest
                slots[i] = cell_slot
                break
            if reusable < 0 and slots[i] < floor_cell:
                reusable = i
            i += 1
            if i == cells:
                i = 0
        self._count_new(slot)

    def _count_new(self, slot: int) -> None:
        self._per_slot[slot] = self._per_slot.get(slot, 0) + 1
        self._live += 1
        if self._max_ids is not None and self._live > self._max_ids:
            self._forget_oldest_slots(self._max_ids)

    def _insert_new(self, digest: int, cell_slot: int) -> None:
        """Put a digest known to be absent into the first empty cell of its probe sequence."""
        keys = self._keys
        cells = len(keys)
        i = digest * cells >> 64
        while keys[i]:
            i += 1
            if i == cells:
                i = 0
        keys[i] = digest
        self._slots[i] = cell_slot
        self._used += 1

    def _advance(self, slot: int) -> None:
        """The clock moves on to `slot`: the slots it leaves behind the horizon are forgotten."""
        if self._clock == _BEFORE_ALL:
            self._base = self._evicted_below = self._floor = slot - SLOTS_PER_HORIZON
            self._floor_cell = 0
        self._clock = slot
        self._set_floor(max(self._evicted_below, slot - SLOTS_PER_HORIZON))
        if slot - self._base > _MAX_SLOT:
            self._rehash(rebase=True)

    def _forget_oldest_slots(self, max_ids: int) -> None:
        while self._live > max_ids:
            oldest = min(self._per_slot)
            if oldest >= self._clock:
                return  # the newest slot is kept whole
            self._evicted_below = oldest + 1
            self._set_floor(oldest + 1)

    def _set_floor(self, floor: int) -> None:
        if floor <= self._floor:
            return
        for slot in [s for s in self._per_slot if s < floor]:
            self._live -= self._per_slot.pop(slot)
        self._floor = floor
        self._floor_cell = floor - self._base

    def _rehash(self, *, rebase: bool = False) -> None:
        """A new table for 1.5 times the live ids (at LOAD), without the expired cells; with
        `rebase`, cells count slots from the floor on."""
        shift = self._floor - self._base if rebase else 0
        old_keys, old_slots, floor_cell = self._keys, self._slots, self._floor_cell
        cells = max(MIN_CELLS, int((self._live + 1) * GROWTH / LOAD) + 1)
        keys = array("Q", [0]) * cells
        slots = array("H", [0]) * cells
        for key, cell_slot in zip(old_keys, old_slots, strict=True):
            if key and cell_slot >= floor_cell:
                i = key * cells >> 64
                while keys[i]:
                    i += 1
                    if i == cells:
                        i = 0
                keys[i] = key
                slots[i] = cell_slot - shift
        self._keys, self._slots = keys, slots
        self._used = self._live
        self._limit = int(cells * LOAD)
        self._base += shift
        self._floor_cell = self._floor - self._base
