"""No head-of-line blocking behind one busy key, on the real broker: a key's long backlog does not
hold back the other keys of its partition (the window is bounded by bytes: relay/worker/keys.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from tests.bench.common import memory_kb
from tests.conftest import MakeSettings, Publish, StartWorker
from tests.handlers_for_tests import HttpHandler
from tests.support import eventually, handler, ids, new_event

pytestmark = pytest.mark.rabbit

BUSY = 500  # messages of the busy invoice
OTHERS = 50  # invoices with one message each, published after it
LATENCY = 0.020  # the endpoint's answer time: the busy invoice alone takes BUSY * LATENCY


@pytest.mark.timeout(150)
async def test_the_keys_behind_a_long_backlog_of_one_key_are_not_held_back(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given a handler with 4 partitions and a 20 ms endpoint, and queued: 500 messages of one
    # invoice, then one message each of 50 other invoices (a dozen share its partition)
    http_handler.latency = LATENCY
    settings = make_settings(handlers=[handler({"url": http_handler.url}, partitions=4)])
    busy = [new_event(settings, 1) for _ in range(BUSY)]
    others = [new_event(settings, invoice) for invoice in range(2, OTHERS + 2)]
    await publish(settings, *busy, *others)
    peak_kb, before_kb = 0, memory_kb(os.getpid(), "VmRSS")

    async def sample() -> None:
        nonlocal peak_kb
        while True:
            peak_kb = max(peak_kb, memory_kb(os.getpid(), "VmRSS"))
            await asyncio.sleep(0.05)

    sampling = asyncio.ensure_future(sample())

    # When the worker starts
    started = time.monotonic()
    await start_worker(settings)

    # Then the 50 are all delivered within 3 s of the first delivery, long before the busy
    # invoice is
    wanted = set(ids(others))
    await eventually(
        lambda: wanted <= set(http_handler.accepted()), what="the 50 invoices", timeout=10
    )
    first = min(r.at for r in http_handler.requests)
    others_done = max(r.at for r in http_handler.requests if r.id in wanted) - first
    await eventually(
        lambda: len(http_handler.accepted()) >= BUSY + OTHERS, what="everything", timeout=90
    )
    busy_done = max(r.at for r in http_handler.requests) - first
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    print(
        f"\nfrom the first delivery: the 50 invoices in {others_done:.2f} s, the busy invoice in"
        f" {busy_done:.2f} s (the worker started {first - started:.2f} s before it); RSS of the"
        f" test process {before_kb // 1024} MB before, {peak_kb // 1024} MB at most"
    )
    assert others_done < 3.0, others_done
    assert busy_done > BUSY * LATENCY
    # and every invoice in order, each message once
    assert http_handler.accepted("invoice:1") == ids(busy)
    for event in others:
        assert http_handler.accepted(event.key) == [event.message_id]
    assert len(http_handler.accepted()) == BUSY + OTHERS
