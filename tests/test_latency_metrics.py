"""Where a webhook's time goes, as metrics: end to end from acceptance to final outcome, waiting
behind older messages of its key, a handler parked. The arithmetic runs on fakes (tests/fakes.py)
in milliseconds; one webhook through the real broker, from the ingress's publisher to an HTTP
handler, shows the figures plausible across processes' clocks (marked `rabbit`)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from prometheus_client import REGISTRY

from relay import wire
from tests.conftest import MakeSettings, Publish, StartWorker
from tests.fakes import REJECTED, UNAVAILABLE, a_rig
from tests.handlers_for_tests import Held, HttpHandler
from tests.support import eventually, handler, new_event

HELD_SECONDS = 0.3  # how long a test's handler holds a delivery: the scenario's time


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def histogram(metric: str, **labels: str) -> tuple[float, float]:
    """(count, sum) of a histogram's series so far: a test compares them before and after."""
    return sample(f"{metric}_count", **labels), sample(f"{metric}_sum", **labels)


def accepted_ago(seconds: float, message_id: str) -> bytes:
    """An envelope (the fields read here) of a webhook the ingress accepted `seconds` ago."""
    received = datetime.now(UTC) - timedelta(seconds=seconds)
    return orjson.dumps({"id": message_id, "received_at": received.isoformat()})


# --- on fakes ---------------------------------------------------------------------------------


@pytest.mark.timeout(5)
async def test_end_to_end_runs_from_acceptance_to_the_final_outcome_by_outcome() -> None:
    rig = await a_rig({"rejected": [REJECTED]})
    name = rig.scheduler.handler.name
    delivered = histogram("relay_end_to_end_seconds", handler=name, outcome="delivered")
    dead = histogram("relay_end_to_end_seconds", handler=name, outcome="dead-lettered")

    # Given webhooks accepted 2 s and 5 s ago, one of which the handler rejects, and one
    # accepted an hour ago that a replay sends again
    rig.queue.put("late", key="invoice:1", body=accepted_ago(2, "late"))
    rig.queue.put("rejected", key="invoice:2", body=accepted_ago(5, "rejected"))
    replayed = {wire.REPLAYED_HEADER: "6dd6017fb72f"}
    rig.queue.put("again", key="invoice:3", body=accepted_ago(3600, "again"), headers=replayed)
    await rig.until(lambda: len(rig.queue.acked) == 3)

    # Then each final outcome counts once, with its time since acceptance; the replay not at all
    count, seconds = histogram("relay_end_to_end_seconds", handler=name, outcome="delivered")
    assert count - delivered[0] == 1
    assert 2 <= seconds - delivered[1] < 3
    count, seconds = histogram("relay_end_to_end_seconds", handler=name, outcome="dead-lettered")
    assert count - dead[0] == 1
    assert 5 <= seconds - dead[1] < 6
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_message_behind_another_of_its_key_counts_the_time_it_waited() -> None:
    rig = await a_rig()
    name = rig.scheduler.handler.name
    before = histogram("relay_key_wait_seconds", handler=name)
    at_once = sample("relay_key_wait_seconds_bucket", handler=name, le="0.001")

    # Given a delivery held by its handler, and the next message of its key behind it
    rig.target.hold("a1")
    rig.queue.put("a1")
    rig.queue.put("a2")
    await rig.until(lambda: rig.target.called("a1") == 1)

    # When the handler answers after a while
    await asyncio.sleep(HELD_SECONDS)
    rig.target.let_go("a1")
    await rig.until(lambda: rig.queue.acked == ["a1", "a2"])

    # Then a1 waited for nothing, a2 for a1's delivery
    count, seconds = histogram("relay_key_wait_seconds", handler=name)
    assert count - before[0] == 2
    assert HELD_SECONDS <= seconds - before[1] < HELD_SECONDS + 1
    assert sample("relay_key_wait_seconds_bucket", handler=name, le="0.001") - at_once == 1
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_park_counts_its_length_once_a_probe_succeeds() -> None:
    probe_every = 0.2
    rig = await a_rig({"a1": [UNAVAILABLE] * 2}, max_attempts=2, backoff_max_ms=200)
    name = rig.scheduler.handler.name
    before = histogram("relay_parked_seconds", handler=name)

    # Given a handler parked by two failures in a row
    rig.queue.put("a1")
    await rig.until(lambda: rig.scheduler.policy.parked)
    assert histogram("relay_parked_seconds", handler=name) == before  # not while parked

    # When its probe, one interval later, succeeds
    await rig.until(lambda: rig.queue.acked == ["a1"])

    # Then the park counts once, at least that interval long
    count, seconds = histogram("relay_parked_seconds", handler=name)
    assert count - before[0] == 1
    assert probe_every <= seconds - before[1] < probe_every + 1
    await rig.stop()


# --- through the broker -----------------------------------------------------------------------


@pytest.mark.rabbit
@pytest.mark.timeout(30)
async def test_a_webhook_held_by_its_handler_counts_end_to_end_and_holds_up_its_key(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    settings = make_settings(handlers=[handler({"url": http_handler.url})])
    name = settings.handlers[0].name
    end_to_end = histogram("relay_end_to_end_seconds", handler=name, outcome="delivered")
    key_wait = histogram("relay_key_wait_seconds", handler=name)
    await start_worker(settings)

    # Given two webhooks of one invoice, the first held by the handler
    first, second = new_event(settings, 7), new_event(settings, 7)
    release = asyncio.Event()
    http_handler.plan(first.message_id, [Held(release)])
    published = time.monotonic()
    await publish(settings, first, second)
    await eventually(lambda: http_handler.of(first.message_id), what="the first delivery")

    # When the handler answers after a while
    await asyncio.sleep(HELD_SECONDS)
    release.set()
    await eventually(lambda: len(http_handler.accepted()) == 2, what="both delivered")

    def recorded() -> bool:
        count, _ = histogram("relay_end_to_end_seconds", handler=name, outcome="delivered")
        return count == end_to_end[0] + 2

    await eventually(recorded, what="both outcomes recorded")
    took = time.monotonic() - published

    # Then both took at least the hold end to end, and no longer than the test did
    count, seconds = histogram("relay_end_to_end_seconds", handler=name, outcome="delivered")
    assert 2 * HELD_SECONDS <= seconds - end_to_end[1] <= 2 * took
    # and the second waited behind the first for at least the hold
    count, seconds = histogram("relay_key_wait_seconds", handler=name)
    assert count - key_wait[0] == 2
    assert HELD_SECONDS <= seconds - key_wait[1] <= took
