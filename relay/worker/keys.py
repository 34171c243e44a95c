"""The messages of one partition's window, queued per ordering key, and the window's size.

Plain code, no broker: a key's next message is released only when the one before it is done,
so many keys are delivered at once and each key one message at a time, in window order.

The window is bounded by memory, not by a count of a few hundred messages: a key with a long
backlog (a catch-up re-sends many activities of one invoice) must not fill it, or the other
keys queued behind it in the partition wait for it. RabbitMQ bounds a consumer only by a count
(its prefetch: basic.qos prefetch_size is not implemented), fixed when the consumer starts (a
later basic.qos does not change it, docs/RABBITMQ.md); so the count is derived from the bytes
allowed and the messages' mean size (`prefetch`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

# What holding a message costs beyond its body, estimated: its properties and headers, the
# delivery's objects in aiormq and relay's record of it
MESSAGE_OVERHEAD_BYTES = 1024
# The mean size assumed before a partition has seen a message: a webhook of 1 KiB (an Envoice
# activity's is about 500 bytes)
ASSUMED_MESSAGE_BYTES = 2048


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


class Sizes:
    """The mean size of the messages a partition has held (body and overhead), across its
    channels: the next channel's prefetch is sized by it."""

    def __init__(self) -> None:
        self._count = 0
        self._bytes = 0

    def add(self, body: int) -> None:
        self._count += 1
        self._bytes += body + MESSAGE_OVERHEAD_BYTES

    @property
    def mean(self) -> float:
        return self._bytes / self._count if self._count else ASSUMED_MESSAGE_BYTES


def prefetch(window: int, window_bytes: int, mean_size: float) -> int:
    """A consumer's prefetch: as many messages of `mean_size` as `window_bytes` holds, at least
    one, at most `window`."""
    return max(1, min(window, int(window_bytes // max(mean_size, 1))))
