"""The messages of one partition's window, queued per ordering key.

Plain code, no broker: a key's next message is released only when the one before it is done,
so many keys are delivered at once and each key one message at a time, in window order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Keyed(Protocol):
    @property
    def key(self) -> str: ...


T = TypeVar("T", bound=Keyed)


class KeyQueues(Generic[T]):
    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}

    def add(self, item: T) -> bool:
        """Queue `item` behind the other messages of its key; True if it is the key's head,
        ready to be delivered now."""
        queue = self._queues.get(item.key)
        if queue is None:
            self._queues[item.key] = deque((item,))
            return True
        queue.append(item)
        return False

    def done(self, item: T) -> T | None:
        """`item`, its key's head, has a final outcome: the key's next message, now ready."""
        queue = self._queues[item.key]
        if queue[0] is not item:
            raise ValueError(f"{item!r} is not the head of key {item.key!r}")
        queue.popleft()
        if queue:
            return queue[0]
        del self._queues[item.key]
        return None

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[T]:
        for queue in self._queues.values():
            yield from queue

    def clear(self) -> None:
        self._queues.clear()
