"""A handler's rate on the real broker, measured at the endpoint: exact across workers
(`max_rate` is the handler's, not each worker's), and adapting to an endpoint's 429s
(relay/worker/rate.py). Each test prints its figures (shown with `pytest -rP`).

Worker processes started together do not spread a handler's partitions: the broker makes the
first to subscribe the active consumer of each (the others stand by), so the test of workers
holding different shares runs them in-process, where it can hand partitions over."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Any

import pytest
from aiohttp import web

from relay.worker import Worker
from tests.conftest import MakeSettings, Publish, StartWorker
from tests.handlers_for_tests import HttpHandler
from tests.processes import (
    STARTUP_SECONDS,
    Config,
    EnvoiceSender,
    Relay,
    RelayProcess,
    billing_handler,
    http_deliveries,
    ingress_ready,
    worker_consuming,
)
from tests.support import events_per_invoice, eventually, handler, ids, logged

pytestmark = [pytest.mark.rabbit]


class LimitedEndpoint(HttpHandler):
    """Answers 429 to a request that would make more than `limit` 2xx in the last second (None:
    no limit)."""

    def __init__(self) -> None:
        super().__init__()
        self.limit: int | None = None
        self._window: deque[float] = deque()

    async def _receive(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        self.default = 200
        if self.limit is not None and len(self._window) >= self.limit:
            self.default = 429
        else:
            self._window.append(now)
        return await super()._receive(request)


def rate(times: list[float]) -> float:
    """Deliveries per second over `times` (sorted): intervals over their span."""
    return (len(times) - 1) / (times[-1] - times[0])


def steady_rate(endpoint: HttpHandler, delivered: list[dict[str, Any]]) -> tuple[float, str]:
    """The rate at the endpoint from its 60th delivery until the first partition ran dry (from
    then on, with a skewed key distribution, that partition's share goes unused), and the
    partitions' sizes. `delivered`: the workers' `delivered` log lines."""
    partition_of = {e["message_id"]: e["partition"] for e in delivered}
    arrivals = sorted((r.at, partition_of[r.id]) for r in endpoint.requests if r.accepted)
    sizes = Counter(p for _, p in arrivals)
    first_dry = min(max(t for t, p in arrivals if p == q) for q in sizes)
    times = [t for t, _ in arrivals if t <= first_dry][60:]
    return rate(times), f"partition sizes {sorted(sizes.values())}"


async def start_ingress(relay: Relay, config: Config) -> None:
    ingress = await relay.run("ingress", config=config)
    await eventually(
        lambda: ingress_ready(ingress, config), timeout=STARTUP_SECONDS, what="ingress ready"
    )


async def start_workers(relay: Relay, config: Config, count: int) -> list[RelayProcess]:
    """`count` workers started at once, so that they share the partitions between them."""
    started = [await relay.run("worker", config=config) for _ in range(count)]
    await eventually(
        lambda: all(worker_consuming(w) for w in started),
        timeout=STARTUP_SECONDS,
        what="workers consuming",
    )
    return started


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 3])
async def test_max_rate_is_the_handlers_whatever_the_number_of_workers(
    relay: Relay, http_handler: HttpHandler, workers: int
) -> None:
    # Given a handler at max_rate = 40 over 4 partitions, and `workers` worker processes
    config = relay.config(billing_handler(http_handler, max_rate=40))
    await start_ingress(relay, config)
    started = await start_workers(relay, config, workers)
    # When 600 webhooks over 60 invoices are accepted at once (a backlog within a second)
    sender = EnvoiceSender.to(config)
    await sender.send(range(1, 61), each=10)
    assert len(sender.ledger) == 600
    # Then all are delivered, each invoice in order
    tally = await sender.ledger.delivered(
        lambda: http_deliveries(http_handler), config.settings, timeout=40
    )
    assert tally.ok, str(tally)
    # at 40/s +- 15% at the endpoint over the steady part (until a partition ran dry)
    times = sorted(r.at for r in http_handler.requests if r.accepted)
    await eventually(lambda: sum(w.logged("delivered") for w in started) >= 600, what="logged")
    delivered = [e for w in started for e in w.events("delivered")]
    steady, sizes = steady_rate(http_handler, delivered)
    held = [len({e["partition"] for e in w.events("delivered")}) for w in started]
    print(f"workers={workers} partitions delivered per worker={held} steady={steady:.1f}/s "
          f"whole drain={rate(times):.1f}/s {sizes} {tally.line()}")  # fmt: skip
    assert 40 * 0.85 <= steady <= 40 * 1.15


@pytest.mark.timeout(120)
async def test_the_rate_settles_under_an_endpoints_limit_and_rises_when_it_is_lifted(
    relay: Relay,
) -> None:
    endpoint = LimitedEndpoint()
    async with endpoint:
        # Given an endpoint that answers 429 above 30 requests/s, and a handler at max_rate = 60
        # (many attempts allowed: a 429 is retried, never dead-lettered here)
        endpoint.limit = 30
        handler = billing_handler(endpoint, max_rate=60, max_attempts=1000)
        config = relay.config(handler)
        await start_ingress(relay, config)
        # and a backlog of 2400 webhooks over 100 invoices
        sender = EnvoiceSender.to(config)
        await sender.send(range(1, 101), each=24)
        # When a worker drains it for 40 s, then the limit is lifted for 15 s
        await relay.worker(config)
        await eventually(lambda: len(endpoint.requests) > 0, what="first delivery")
        start = endpoint.requests[0].at
        await asyncio.sleep(40)
        endpoint.limit = None
        await asyncio.sleep(15)

    def accepted(since: float, until: float) -> list[float]:
        return [r.at for r in endpoint.requests if r.accepted and since <= r.at - start < until]

    def refused(since: float, until: float) -> int:
        return sum(
            1 for r in endpoint.requests if r.status == 429 and since <= r.at - start < until
        )

    settled, lifted = rate(accepted(20, 40)), rate(accepted(47, 55))
    print(f"429s: first 10 s {refused(0, 10)}, 10-40 s {refused(10, 40)}; "
          f"rate 10-20 s {rate(accepted(10, 20)):.1f}/s, 20-40 s {settled:.1f}/s, "
          f"after the lift (47-55 s) {lifted:.1f}/s")  # fmt: skip
    # Then from 20 s the rate is near the limit, with few 429s after the first 10 s
    assert 30 * 0.8 <= settled <= 30 * 1.05
    assert refused(10, 40) <= 30
    # and it rises again once the limit is lifted
    assert lifted >= 30 * 1.3
    # and each invoice's deliveries so far are in acceptance order
    for key, accepted_ids in sender.ledger.accepted.items():
        got = [i for k, i in http_deliveries(endpoint) if k == key]
        assert got == accepted_ids[: len(got)], key


async def hand_over(worker: Worker, indexes: set[int]) -> None:
    """Close `worker`'s channels of partitions `indexes`: the broker makes the next waiting
    consumer of each the active one, and the worker consumes them again, from the back."""
    partitions = [p for p in worker._partitions if p.index in indexes]
    old = {p.index: p._channel for p in partitions}
    for partition in partitions:
        await partition._channel.close()
    await eventually(
        lambda: all(p._channel is not old[p.index] for p in partitions),
        timeout=10,
        what="channels opened again",
    )


@pytest.mark.timeout(90)
async def test_workers_holding_different_shares_of_the_partitions_add_up_to_max_rate(
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    http_handler: HttpHandler,
    logs: list[dict[str, Any]],
) -> None:
    # Given a handler at max_rate = 40 over 4 partitions, and three workers holding 1, 1 and 2
    # of them (per worker, max_rate would be 120/s)
    options = {"max_rate": 40, "partitions": 4, "max_attempts": 5}
    settings = make_settings(handlers=[handler({"url": http_handler.url}, **options)])
    per_invoice = events_per_invoice(settings, invoices=60, each=10)
    await publish(settings)  # the topology, before the workers
    a, b, c = [(await start_worker(settings)).worker for _ in range(3)]
    await hand_over(a, {1, 2, 3})  # to b, a waits behind c
    await hand_over(b, {2, 3})  # to c
    # When 600 webhooks over 60 invoices are published at once
    await asyncio.gather(*(publish(settings, *events) for events in per_invoice.values()))
    # Then all are delivered, each invoice in order
    await eventually(lambda: len(http_handler.accepted()) >= 600, timeout=40, what="600")
    for events in per_invoice.values():
        assert http_handler.accepted(events[0].key) == ids(events)
    # by the three workers as arranged
    held = [sorted(p.index for p in w._partitions if p.active) for w in (a, b, c)]
    assert held == [[0], [1], [2, 3]]
    # at 40/s +- 15% over the steady part (until a partition ran dry: then its worker's share
    # goes unused, the skew docs/GUARANTEES.md "Rate" describes)
    times = sorted(r.at for r in http_handler.requests if r.accepted)
    # (a worker logs `delivered` a moment after the endpoint answered)
    await eventually(lambda: len(logged(logs, "delivered")) >= 600, timeout=10, what="logged")
    steady, sizes = steady_rate(http_handler, logged(logs, "delivered"))
    print(f"in-process workers holding {held}: steady={steady:.1f}/s "
          f"whole drain={rate(times):.1f}/s {sizes}")  # fmt: skip
    assert 40 * 0.85 <= steady <= 40 * 1.15
