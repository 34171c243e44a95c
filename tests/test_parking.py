"""Parking (docs/GUARANTEES.md): a handler that keeps failing is parked and probed every
backoff_max_ms; nothing is dropped or skips ahead; its state is visible from outside the worker;
other handlers are not held up."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from tests.conftest import MakeSettings, Publish, StartWorker
from tests.handlers_for_tests import Held, HttpHandler
from tests.support import (
    events_per_invoice,
    eventually,
    handler,
    ids,
    logged,
    new_event,
    of_invoice,
    relay_command,
    steady_stream,
)

pytestmark = pytest.mark.rabbit


@pytest.mark.fault
@pytest.mark.parametrize(
    ("outage_seconds", "backoff_max_ms"),
    # 60 s: a parked handler waits through many maximal backoffs and a heartbeat interval (60 s)
    [(10, 1000), pytest.param(60, 5000, marks=pytest.mark.timeout(180))],
    ids=["10s", "60s"],
)
async def test_an_outage_under_a_steady_stream_is_probed_not_stormed_and_loses_nothing(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    outage_seconds: int,
    backoff_max_ms: int,
) -> None:
    # Given a handler delivering 64 at a time over 2 partitions, parked after 3 failures in a
    # row, then probed every backoff_max_ms
    invoices, max_attempts = 6, 3
    settings = make_settings(
        handlers=[
            handler({"url": http_handler.url}, partitions=2, concurrency=64,
                    max_attempts=max_attempts, backoff_initial_ms=100,
                    backoff_max_ms=backoff_max_ms)
        ]
    )  # fmt: skip
    await start_worker(settings)

    # When the handler is down for a while as 5 events/s come in for 6 invoices
    http_handler.default = 503
    async with steady_stream(publish, settings, invoices=invoices, per_second=5) as backlog:
        await asyncio.sleep(outage_seconds)  # the outage itself: the scenario's time
        outage_requests = len(http_handler.requests)
        http_handler.default = 200
    # and more come in once it is back
    live = [new_event(settings, invoice) for invoice in range(1, 7) for _ in range(3)]
    await publish(settings, *live)

    # Then during the outage it got one probe per backoff_max_ms for the whole handler, after
    # the failures that parked it (at most one per invoice in flight, and its retries)
    print(f"outage: {outage_requests} requests in {outage_seconds} s, {len(backlog)} published")
    probes = outage_seconds * 1000 // backoff_max_ms
    assert probes - 1 <= outage_requests <= invoices + max_attempts + probes + 1
    # and afterwards everything arrives once, each invoice in publish order: its backlog first,
    # then what came in after the outage
    everything = backlog + live
    await eventually(
        lambda: len(http_handler.accepted()) >= len(everything),
        timeout=30,
        what=f"all {len(everything)} delivered",
    )
    assert sorted(http_handler.accepted()) == sorted(ids(everything))
    for invoice in range(1, 7):
        key = f"invoice:{invoice}"
        expected = of_invoice(everything, invoice)  # by the InvoiceId sent, not relay's key
        assert expected, key
        assert http_handler.accepted(key) == expected, key


# --- state seen from outside ------------------------------------------------------------------


async def handler_status(config: str, name: str) -> dict[str, Any]:
    """The handler's entry in `relay status --json`."""
    result = await relay_command("status", "--json", "--config", config)
    assert result.returncode == 0, result.stderr
    [status] = [h for h in orjson.loads(result.stdout)["handlers"] if h["name"] == name]
    return status  # type: ignore[no-any-return]


async def shows(config: str, name: str, state: str) -> bool:
    """Whether `relay status` shows the handler in this state."""
    current: str = (await handler_status(config, name))["state"]
    return current == state


def state_gauge(name: str) -> dict[str, float]:
    """relay_handler_state of the handler: its partitions in each state."""
    return {
        state: REGISTRY.get_sample_value("relay_handler_state", {"handler": name, "state": state})
        or 0
        for state in ("live", "retrying", "parked")
    }


def parks(name: str) -> tuple[float, float]:
    """relay_parked_seconds of the handler: parks ended, and their seconds."""
    count = REGISTRY.get_sample_value("relay_parked_seconds_count", {"handler": name})
    seconds = REGISTRY.get_sample_value("relay_parked_seconds_sum", {"handler": name})
    return count or 0, seconds or 0


async def test_handler_state_is_visible_in_status_logs_and_metrics(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    logs: list[dict[str, Any]],
) -> None:
    # Given a one-partition handler parked after 2 failures, probed every second; its first
    # attempt fails and its second is held in flight
    settings = make_settings(
        handlers=[
            handler({"url": http_handler.url}, max_attempts=2, backoff_initial_ms=100,
                    backoff_max_ms=1000, timeout_seconds=30)
        ]
    )  # fmt: skip
    name, partition = settings.handlers[0].name, settings.handlers[0].queue(0)
    config = make_settings.config_file(settings)
    event = new_event(settings)
    second_attempt_ends = asyncio.Event()
    http_handler.default = 503
    http_handler.plan(event.message_id, [503, Held(second_attempt_ends, then=503)])
    await start_worker(settings)

    # When the event is published and its second attempt is in flight
    await publish(settings, event)
    await eventually(lambda: len(http_handler.requests) == 2, what="the second attempt")

    # Then `relay status` shows the handler retrying, consumed, the message held: unacked, and
    # counted in the depth (the management API samples queue figures every 5 s)
    async def holding() -> dict[str, Any] | None:
        status = await handler_status(config, name)
        return status if status["partitions"][0]["unacked"] == 1 else None

    status = await eventually(holding, timeout=20, what="status shows the held message")
    assert status["state"] == "retrying"
    [shown] = status["partitions"]
    assert datetime.fromisoformat(shown.pop("since")) <= datetime.now(UTC)  # in it since then
    assert shown.pop("acked_per_second") >= 0  # as the broker sampled it
    assert shown == {
        "queue": partition, "ready": 0, "unacked": 1, "depth": 1, "consumers": 1,
        "state": "retrying", "detail": "HTTP 503", "in_config": True, "rate": None,
    }  # fmt: skip
    assert state_gauge(name) == {"live": 0, "retrying": 1, "parked": 0}

    # When the second attempt fails too
    second_attempt_ends.set()

    # Then it shows parked
    await eventually(lambda: shows(config, name, "parked"), timeout=20, what="status parked")
    assert state_gauge(name) == {"live": 0, "retrying": 0, "parked": 1}
    assert parks(name) == (0, 0)  # counted when it ends
    probes = len(http_handler.requests)

    # When the handler is back
    http_handler.default = 200

    # Then a probe delivers the message, and the handler shows live again
    await eventually(lambda: shows(config, name, "live"), timeout=20, what="status live")
    assert http_handler.accepted() == [event.message_id]
    assert len(http_handler.requests) == probes + 1
    assert state_gauge(name) == {"live": 1, "retrying": 0, "parked": 0}
    # and the park counts once, at least the second until the probe
    count, seconds = parks(name)
    assert count == 1
    assert 1 <= seconds < 20
    # and the worker logged each change
    changes = [(line["previous"], line["state"]) for line in logged(logs, "handler state")]
    assert changes == [("unknown", "retrying"), ("retrying", "parked"), ("parked", "live")]


async def test_a_new_worker_clears_the_parked_state_its_predecessor_left(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given a handler parked while its downstream was down, and its worker stopped
    settings = make_settings(
        handlers=[handler({"url": http_handler.url}, max_attempts=2, backoff_max_ms=1000)]
    )
    name = settings.handlers[0].name
    config = make_settings.config_file(settings)
    event = new_event(settings)
    http_handler.default = 503
    worker = await start_worker(settings)
    await publish(settings, event)
    await eventually(lambda: shows(config, name, "parked"), timeout=20, what="status parked")
    await worker.stop()

    # When the downstream is back and a new worker delivers the message
    http_handler.default = 200
    await start_worker(settings)
    await eventually(lambda: http_handler.accepted() == [event.message_id], what="delivered")

    # Then `relay status` no longer shows the handler parked
    await eventually(lambda: shows(config, name, "live"), timeout=10, what="status live")


# --- isolation --------------------------------------------------------------------------------


async def test_a_parked_handler_does_not_hold_up_another_handler_of_the_same_events(
    make_settings: MakeSettings, start_worker: StartWorker, publish: Publish
) -> None:
    async with HttpHandler() as failing, HttpHandler() as working:
        # Given two handlers of the same events, one of them down
        settings = make_settings(
            handlers=[
                handler({"url": failing.url}, name="failing", partitions=2, max_attempts=2),
                handler({"url": working.url}, name="working", partitions=2),
            ]
        )
        failing.default = 503
        await start_worker(settings)

        # When 30 events for 3 invoices are published
        per_invoice = events_per_invoice(settings, invoices=3, each=10)
        await asyncio.gather(*(publish(settings, *events) for events in per_invoice.values()))

        # Then the working handler gets all of them while the other is parked
        await eventually(lambda: len(working.accepted()) == 30, what="30 delivered to working")
        failing_name = settings.handlers[0].name
        await eventually(lambda: state_gauge(failing_name)["parked"], what="failing parked")
        assert not failing.accepted()
        # and when the other is back, it gets all of them too, in order
        failing.default = 200
        await eventually(lambda: len(failing.accepted()) >= 30, what="30 delivered to failing")
        for invoice, events in per_invoice.items():
            key = f"invoice:{invoice}"
            assert working.accepted(key) == ids(events), key
            assert failing.accepted(key) == ids(events), key
