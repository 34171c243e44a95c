"""The worker in-process against the real broker: delivery, order, retries, dead letters, stops."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar, Protocol

import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from relay import Reject, Retry
from relay.settings import Settings
from tests import handlers_for_tests
from tests.conftest import AMQP_URL, MakeSettings, Publish, StartWorker
from tests.handlers_for_tests import HANG, HttpHandler
from tests.support import (
    TcpProxy,
    depth_is,
    events_per_invoice,
    eventually,
    handler,
    ids,
    logged,
    new_event,
    queue_depth,
)

pytestmark = pytest.mark.rabbit

RECORD = {"call": "tests.handlers_for_tests:record"}


async def dead_letter(channel: AbstractChannel, settings: Settings) -> AbstractIncomingMessage:
    """The next message of the handler's dead-letter queue (waits for it)."""
    queue = await channel.get_queue(settings.handlers[0].dead_letter_queue)
    message: AbstractIncomingMessage = await eventually(
        lambda: queue.get(no_ack=True, fail=False), what="a dead letter"
    )
    return message


# --- fixtures ---------------------------------------------------------------------------------


class Downstream(Protocol):
    """A handler under test, Python or HTTP, seen the same way: plan failures, read calls."""

    config: dict[str, Any]

    def fail(self, message_id: str, *kinds: str) -> None:
        """Fail the message's next deliveries: each kind is "transient" or "permanent"."""

    def calls(self) -> list[str]:
        """Message ids of every delivery attempt, in order."""
        ...

    def dead_letter_reason(self) -> tuple[str, int]:
        """The x-relay-reason and x-relay-status of a permanent failure."""
        ...


class PythonDownstream:
    config = RECORD

    def fail(self, message_id: str, *kinds: str) -> None:
        made: dict[str, Callable[[], Exception]] = {
            "transient": lambda: Retry("busy"),
            "permanent": lambda: Reject("no such invoice"),
        }
        handlers_for_tests.failures[message_id] = [made[kind]() for kind in kinds]

    def calls(self) -> list[str]:
        return [m["id"] for m in handlers_for_tests.calls]

    def dead_letter_reason(self) -> tuple[str, int]:
        return "Reject: no such invoice", 0


class HttpDownstream:
    STATUS: ClassVar = {"transient": 503, "permanent": 400}

    def __init__(self, server: HttpHandler) -> None:
        self.server = server
        self.config = {"url": server.url}

    def fail(self, message_id: str, *kinds: str) -> None:
        self.server.plan(message_id, [self.STATUS[kind] for kind in kinds])

    def calls(self) -> list[str]:
        return [r.id for r in self.server.requests]

    def dead_letter_reason(self) -> tuple[str, int]:
        return "HTTP 400", 400


@pytest.fixture(params=["python", "http"])
def downstream(request: pytest.FixtureRequest, http_handler: HttpHandler) -> Downstream:
    return PythonDownstream() if request.param == "python" else HttpDownstream(http_handler)


async def calls_become(downstream: Downstream, expected: list[str]) -> None:
    """Wait until as many attempts as expected were made, then compare them exactly."""
    await eventually(lambda: len(downstream.calls()) >= len(expected), what=f"calls {expected}")
    assert downstream.calls() == expected


# --- delivery and order -----------------------------------------------------------------------


async def test_python_handler_gets_the_message_body(
    make_settings: MakeSettings, start_worker: StartWorker, publish: Publish
) -> None:
    settings = make_settings(handlers=[handler(RECORD)])
    event = new_event(settings, invoice=7)
    await start_worker(settings)

    await publish(settings, event)

    [body] = await eventually(lambda: handlers_for_tests.calls, what="a delivery")
    assert body["id"] == event.message_id
    assert (body["source"], body["event"], body["type"]) == ("envoice", "paid", 11)
    assert body["key"] == "invoice:7"
    assert body["occurred_at"] == event.data["CreatedOn"]
    assert body["data"] == event.data
    assert datetime.fromisoformat(body["received_at"]).tzinfo is not None


async def test_python_handler_gets_each_key_in_publish_order(
    make_settings: MakeSettings, start_worker: StartWorker, publish: Publish
) -> None:
    # Given 8 invoices over 2 partitions, 8 events each
    settings = make_settings(handlers=[handler(RECORD, partitions=2)])
    per_invoice = events_per_invoice(settings, invoices=8, each=8)
    await start_worker(settings)

    # When each invoice's events are published in order, invoices concurrently
    await asyncio.gather(*(publish(settings, *events) for events in per_invoice.values()))

    # Then each invoice's events arrive in that order, each once
    total = sum(len(events) for events in per_invoice.values())
    await eventually(lambda: len(handlers_for_tests.calls) >= total, what=f"{total} deliveries")
    for invoice, events in per_invoice.items():
        got = [m["id"] for m in handlers_for_tests.calls if m["key"] == f"invoice:{invoice}"]
        assert got == ids(events), f"invoice {invoice}"


# --- transient failures -----------------------------------------------------------------------


async def test_transient_failures_are_retried_while_the_partition_waits(
    downstream: Downstream,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given two events of one invoice queued, the first failing twice
    settings = make_settings(handlers=[handler(downstream.config)])
    first, second = new_event(settings), new_event(settings)
    downstream.fail(first.message_id, "transient", "transient")
    await publish(settings, first, second)

    # When the worker delivers them
    await start_worker(settings)

    # Then the first is tried three times before the second is tried at all
    await calls_become(downstream, ids([first, first, first, second]))


async def test_a_python_handler_that_crashes_is_retried(
    make_settings: MakeSettings, start_worker: StartWorker, publish: Publish
) -> None:
    settings = make_settings(handlers=[handler(RECORD)])
    first, second = new_event(settings), new_event(settings)
    handlers_for_tests.failures[first.message_id] = [RuntimeError("handler bug")]
    await publish(settings, first, second)

    await start_worker(settings)

    await calls_become(PythonDownstream(), ids([first, first, second]))


async def test_http_retries_count_attempts_and_back_off_exponentially(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    settings = make_settings(
        handlers=[handler({"url": http_handler.url}, backoff_initial_ms=50, backoff_max_ms=1000)]
    )
    first, second = new_event(settings), new_event(settings)
    http_handler.plan(first.message_id, [503, 503])
    await publish(settings, first, second)

    await start_worker(settings)

    await eventually(lambda: http_handler.of(second.message_id), what="the second delivered")
    tries = http_handler.of(first.message_id)
    assert [r.attempt for r in tries] == [1, 2, 3]
    assert http_handler.of(second.message_id)[0].attempt == 1
    # backoff = initial * 2^(n-1), less at most 20% jitter
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(tries)]
    assert gaps[0] >= 0.8 * 0.050
    assert gaps[1] >= 0.8 * 0.100


@pytest.mark.parametrize("backoff_max_ms", [60_000, 100], ids=["max-above", "max-below"])
async def test_retry_after_is_honoured(
    backoff_max_ms: int,
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    settings = make_settings(
        handlers=[handler({"url": http_handler.url}, backoff_max_ms=backoff_max_ms)]
    )
    event = new_event(settings)
    http_handler.plan(event.message_id, [(429, {"Retry-After": "1"})])
    await publish(settings, event)

    await start_worker(settings)

    await eventually(lambda: len(http_handler.of(event.message_id)) >= 2, what="a second try")
    tries = http_handler.of(event.message_id)
    assert tries[1].at - tries[0].at >= 0.9


async def test_a_handler_timeout_is_transient(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given a handler that hangs on the first attempt, longer than the timeout
    settings = make_settings(handlers=[handler({"url": http_handler.url}, timeout_seconds=0.3)])
    first, second = new_event(settings), new_event(settings)
    http_handler.plan(first.message_id, [HANG])
    await publish(settings, first, second)

    # When the worker delivers
    await start_worker(settings)

    # Then the first is given up after the timeout and tried again, before the second
    await calls_become(HttpDownstream(http_handler), ids([first, first, second]))
    tries = http_handler.of(first.message_id)
    assert [r.attempt for r in tries] == [1, 2]
    assert tries[1].at - tries[0].at >= 0.3


# --- permanent failures -----------------------------------------------------------------------


async def test_a_permanent_failure_is_dead_lettered_and_the_partition_moves_on(
    downstream: Downstream,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    channel: AbstractChannel,
) -> None:
    # Given two events of one invoice, the first failing once transiently, then permanently
    settings = make_settings(handlers=[handler(downstream.config)])
    first, second = new_event(settings), new_event(settings)
    downstream.fail(first.message_id, "transient", "permanent")
    await publish(settings, first, second)

    # When the worker delivers them
    await start_worker(settings)

    # Then the second is delivered after the first's two attempts
    await calls_become(downstream, ids([first, first, second]))
    # and the first is in the dead-letter queue, with why, how often and when
    dead = await dead_letter(channel, settings)
    assert dead.message_id == first.message_id
    assert orjson.loads(dead.body)["data"] == first.data
    headers = dead.headers
    reason, status = downstream.dead_letter_reason()
    assert headers["x-relay-handler"] == settings.handlers[0].name
    assert headers["x-relay-reason"] == reason
    assert headers["x-relay-status"] == status
    assert headers["x-relay-attempts"] == 2
    assert headers["x-relay-key"] == first.key
    first_at = datetime.fromisoformat(str(headers["x-relay-first-attempt"]))
    last_at = datetime.fromisoformat(str(headers["x-relay-last-attempt"]))
    assert first_at <= last_at
    assert await queue_depth(channel, settings.handlers[0].dead_letter_queue) == 0


@pytest.mark.parametrize(
    ("status", "transient"),
    [(s, True) for s in (408, 409, 425, 429, 500)] + [(s, False) for s in (401, 404, 410, 422)],
)
async def test_http_status_decides_retry_or_dead_letter(
    status: int,
    transient: bool,
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    channel: AbstractChannel,
) -> None:
    settings = make_settings(handlers=[handler({"url": http_handler.url})])
    first, second = new_event(settings), new_event(settings)
    http_handler.plan(first.message_id, [status])
    await publish(settings, first, second)

    await start_worker(settings)

    retried = [first, first, second] if transient else [first, second]
    await calls_become(HttpDownstream(http_handler), ids(retried))
    dlq = settings.handlers[0].dead_letter_queue
    if transient:
        assert await queue_depth(channel, dlq) == 0
    else:
        dead = await dead_letter(channel, settings)
        assert (dead.message_id, dead.headers["x-relay-status"]) == (first.message_id, status)


# --- stopping and broker loss -----------------------------------------------------------------


async def test_stop_during_backoff_returns_the_message_to_the_head_of_its_queue(
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    channel: AbstractChannel,
) -> None:
    # Given a worker backing off (for ~30 s) after a first failed attempt
    settings = make_settings(
        handlers=[handler(RECORD, backoff_initial_ms=30_000, backoff_max_ms=60_000)]
    )
    partition = settings.handlers[0].queue(0)
    first, second = new_event(settings), new_event(settings)
    handlers_for_tests.failures[first.message_id] = [Retry("busy")]
    worker = await start_worker(settings)
    await publish(settings, first)
    await eventually(lambda: handlers_for_tests.calls, what="the first attempt")
    # and a later event of the same invoice waiting behind it, in the worker's window
    await publish(settings, second)
    await eventually(lambda: depth_is(channel, partition, 0), what="both in the window")
    assert [m["id"] for m in handlers_for_tests.calls] == ids([first])

    # When the worker is stopped
    await worker.stop()

    # Then the held message is back in the queue, not lost
    await eventually(lambda: depth_is(channel, partition, 2), what="both messages queued")
    # and a new worker delivers it before the later one
    await start_worker(settings)
    await calls_become(PythonDownstream(), ids([first, first, second]))


async def test_worker_reconnects_after_the_broker_connection_is_cut(
    make_settings: MakeSettings, start_worker: StartWorker, publish: Publish
) -> None:
    # Given a worker connected through a proxy, and a publisher connected directly
    proxy = TcpProxy()
    await proxy.start()
    partitions = 2
    settings = make_settings(handlers=[handler(RECORD, partitions=partitions)], url=proxy.url())
    direct = replace(settings, broker=replace(settings.broker, url=AMQP_URL))
    per_invoice = events_per_invoice(settings, invoices=6, each=30)
    published = [e.message_id for events in per_invoice.values() for e in events]
    worker = await start_worker(settings)

    def publish_part(part: slice) -> Awaitable[Any]:
        """Each invoice's events in `part`, in order; invoices concurrently."""
        return asyncio.gather(*(publish(direct, *events[part]) for events in per_invoice.values()))

    try:
        # When the connection is cut while the first third is being published and delivered,
        before = publish_part(slice(0, 10))
        await eventually(lambda: len(handlers_for_tests.calls) >= 10, what="deliveries")
        await proxy.cut()
        await eventually(lambda: not worker.consuming, what="the worker noticing the cut")
        await before
        # the second third is published while the worker is cut off,
        await publish_part(slice(10, 20))
        # and the last third once the broker is reachable again (on the same port)
        await proxy.start()
        await eventually(lambda: worker.consuming, what="the worker consuming again")
        await publish_part(slice(20, None))

        # Then the worker has reconnected by itself and delivers everything
        await eventually(
            lambda: {m["id"] for m in handlers_for_tests.calls} >= set(published),
            timeout=20,
            what=f"all {len(published)} delivered",
        )
    finally:
        await worker.stop()
        await proxy.cut()
    # at least once: only what was in flight at the cut may come twice
    duplicates = len(handlers_for_tests.calls) - len(published)
    assert 0 <= duplicates <= settings.handlers[0].concurrency
    # and each invoice in the order published
    for invoice, events in per_invoice.items():
        got = [m["id"] for m in handlers_for_tests.calls if m["key"] == f"invoice:{invoice}"]
        assert list(dict.fromkeys(got)) == ids(events), f"invoice {invoice}"


# --- many keys at once in a partition -----------------------------------------------------------


async def test_a_failing_key_is_retried_while_the_other_keys_of_its_partition_flow(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given one partition holding 5 invoices x 4 events, invoice 3's first answered 500 five
    # times, with quick retries (max_attempts high enough not to give up)
    settings = make_settings(
        handlers=[handler({"url": http_handler.url}, max_attempts=20, backoff_initial_ms=100)]
    )
    per_invoice = events_per_invoice(settings, invoices=5, each=4)
    http_handler.plan(per_invoice[3][0].message_id, [500] * 5)
    await asyncio.gather(*(publish(settings, *events) for events in per_invoice.values()))

    # When the worker delivers them
    await start_worker(settings)
    everything = [e for events in per_invoice.values() for e in events]
    await eventually(lambda: len(http_handler.accepted()) == len(everything), what="all delivered")

    # Then the other invoices were all delivered while invoice 3's head was still failing
    last_failure = max(r.at for r in http_handler.requests if r.status == 500)
    for invoice in (1, 2, 4, 5):
        done_at = max(r.at for r in http_handler.requests if r.key == f"invoice:{invoice}")
        assert done_at < last_failure, invoice
    # and every invoice in order, invoice 3 after its head's 5 failures
    for invoice, events in per_invoice.items():
        assert http_handler.accepted(f"invoice:{invoice}") == ids(events), invoice
    assert [r.attempt for r in http_handler.of(per_invoice[3][0].message_id)] == [1, 2, 3, 4, 5, 6]


async def test_a_key_failing_for_ever_is_dead_lettered_while_the_handler_stays_live(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    channel: AbstractChannel,
    logs: list[dict[str, Any]],
) -> None:
    # Given 4 invoices x 5 events, spaced out so that other invoices succeed between the tries of
    # invoice 2's head, which always answers 500 (a poison message)
    settings = make_settings(
        handlers=[
            handler(
                {"url": http_handler.url},
                max_attempts=3,
                backoff_initial_ms=200,
                backoff_max_ms=1000,
            )
        ]
    )
    per_invoice = events_per_invoice(settings, invoices=4, each=5)
    poison = per_invoice[2][0]
    http_handler.plan(poison.message_id, [500] * 100)
    http_handler.latency = 0.05
    await asyncio.gather(*(publish(settings, *events) for events in per_invoice.values()))

    # When the worker delivers them
    await start_worker(settings)

    # Then the poison message is dead-lettered after 3 tries, with the reason
    dead = await dead_letter(channel, settings)
    assert dead.message_id == poison.message_id
    assert dead.headers["x-relay-reason"] == "failed 3 times in a row, last: HTTP 500"
    assert dead.headers["x-relay-attempts"] == 3
    # and its invoice goes on; everything else is delivered in order
    rest = [e for events in per_invoice.values() for e in events if e is not poison]
    await eventually(lambda: len(http_handler.accepted()) == len(rest), what="the rest")
    for invoice, events in per_invoice.items():
        expected = [e for e in events if e is not poison]
        assert http_handler.accepted(f"invoice:{invoice}") == ids(expected), invoice
    # while the handler was never parked
    states = [line["state"] for line in logged(logs, "handler state")]
    assert "parked" not in states
    assert states[-1] == "live"


async def test_retry_after_holds_every_key_of_the_handler(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given 3 invoices, the first answered 429 with Retry-After: 2
    settings = make_settings(handlers=[handler({"url": http_handler.url}, max_attempts=10)])
    first, second, third = (new_event(settings, invoice) for invoice in (1, 2, 3))
    http_handler.plan(first.message_id, [(429, {"Retry-After": "2"})])
    http_handler.latency = 0.2  # so that the others are still waiting when the 429 comes
    await publish(settings, first, second, third)
    settings = replace(
        settings, handlers=(replace(settings.handlers[0], concurrency=1),)
    )  # one at a time: the 429 comes before the others start

    # When the worker delivers them
    await start_worker(settings)
    await eventually(lambda: len(http_handler.accepted()) == 3, timeout=15, what="3 delivered")

    # Then after the 429 nothing was sent to the handler for 2 s, for any invoice
    answered = http_handler.of(first.message_id)[0].answered_at
    assert answered is not None
    later = [r.at for r in http_handler.requests[1:]]
    assert min(later) - answered >= 1.9


async def test_max_rate_spaces_the_deliveries_of_a_handler(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given 11 events of 11 invoices (nothing else to hold them back), and at most 10/s
    settings = make_settings(handlers=[handler({"url": http_handler.url}, max_rate=10.0)])
    await publish(settings, *(new_event(settings, invoice) for invoice in range(11)))

    # When the worker delivers them
    await start_worker(settings)
    await eventually(lambda: len(http_handler.accepted()) == 11, what="11 delivered")

    # Then the 11 took at least a second: 10 gaps of 0.1 s
    arrivals = sorted(r.at for r in http_handler.requests)
    assert arrivals[-1] - arrivals[0] >= 0.95
