"""What `relay.seen.SeenIds` costs: memory and time per call for 1 million and 10 million ids.

    python -m tests.bench.seen [--sizes 1000000 10000000] [--runs 3]

For each size, each run fills a new SeenIds (30-day horizon) with random digests at 100 a
second, then asks about a million of them (hits) and a million never added (misses). Printed,
each the median of the runs: the bytes of its arrays (`memory_bytes()`), the growth of the
process's resident memory (VmRSS) from before the fill to after it, microseconds per `add`
(the whole fill over its ids, rehashes included) and per `seen`, and the pause of one rehash
of the full table. Times are CPU time of this process (the machine may be shared), the Python
loop that makes the calls included.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from relay.seen import SeenIds, digest

HORIZON = 30 * 86400.0
RATE = 100.0  # ids a second
START = 1.7e9
QUERIES = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    memory_bytes: int
    rss_growth: int
    add_us: float
    hit_us: float
    miss_us: float
    rehash_s: float


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def one_run(digests: array[int], times: array[float], misses: array[int]) -> Run:
    gc.collect()
    before = rss_bytes()
    seen = SeenIds(HORIZON)
    add = seen.add
    started = time.process_time()
    for d, at in zip(digests, times, strict=True):
        add(d, at)
    add_s = time.process_time() - started
    rss_growth = rss_bytes() - before

    now = times[-1]
    ask = seen.seen
    hits = digests[:QUERIES]
    started = time.process_time()
    for d in hits:
        ask(d, now)
    hit_s = time.process_time() - started
    started = time.process_time()
    for d in misses:
        ask(d, now)
    miss_s = time.process_time() - started

    assert all(ask(d, now) for d in hits[:1000]), "an added digest not seen"
    memory_bytes = seen.memory_bytes()
    started = time.process_time()
    seen._rehash()  # what one `add` pauses for when the table is this full
    rehash_s = time.process_time() - started
    return Run(
        memory_bytes=memory_bytes,
        rss_growth=rss_growth,
        add_us=add_s / len(digests) * 1e6,
        hit_us=hit_s / len(hits) * 1e6,
        miss_us=miss_s / len(misses) * 1e6,
        rehash_s=rehash_s,
    )


def measure(size: int, runs: int) -> None:
    rng = random.Random(size)
    digests = array("Q", (rng.getrandbits(64) for _ in range(size)))
    times = array("d", (START + n / RATE for n in range(size)))
    misses = array("Q", (rng.getrandbits(64) for _ in range(min(size, QUERIES))))
    results = [one_run(digests, times, misses) for _ in range(runs)]

    def median(field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in results))

    mb = 1 << 20
    print(
        f"{size:>11,} ids: memory_bytes {median('memory_bytes') / mb:7.1f} MiB"
        f" ({median('memory_bytes') / size:4.1f} B/id),"
        f" RSS +{median('rss_growth') / mb:7.1f} MiB;"
        f" add {median('add_us'):.2f} µs, seen hit {median('hit_us'):.2f} µs,"
        f" miss {median('miss_us'):.2f} µs; rehash of the full table {median('rehash_s'):.2f} s"
    )


def measure_digest() -> None:
    ids = [f"evt_{n:012d}" for n in range(QUERIES)]
    started = time.process_time()
    for message_id in ids:
        digest("envoice", message_id)
    print(f"digest(): {(time.process_time() - started) / len(ids) * 1e6:.2f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    measure_digest()
    for size in args.sizes:
        measure(size, args.runs)


if __name__ == "__main__":
    main()
