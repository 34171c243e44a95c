"""Promises of docs/COMMANDS.md and docs/GUARANTEES.md that no other test holds: a broker's nack, a
provider's retry after a publish timeout, the duplicate window's end, and SIGTERM of processes with
work in flight."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from aio_pika.abc import AbstractChannel

from relay import publisher
from relay.config import from_dict as config_from_dict
from relay.settings import Settings
from tests.conftest import AMQP_URL, SECRET, MakeSettings, settings_dict
from tests.handlers_for_tests import HttpHandler
from tests.processes import (
    EXIT_SECONDS,
    STARTUP_SECONDS,
    EnvoiceSender,
    Relay,
    http_deliveries,
    in_background,
)
from tests.support import (
    FakePublisher,
    TcpProxy,
    activity,
    eventually,
    queue_depth,
    running_ingress,
    signed_body,
)

PATH = "/webhooks/envoice"
INVOICES = range(1, 11)
DELIVERY_SECONDS = 45.0


def billing(url: str = "http://127.0.0.1:9/", **options: Any) -> dict[str, Any]:
    return {"name": "billing", "events": ["envoice.#"], "url": url, "partitions": 2, **options}


async def partitions_depth(channel: AbstractChannel, settings: Settings) -> int:
    return sum([await queue_depth(channel, q) for q in settings.handlers[0].queues])


# --- the broker says no ---------------------------------------------------------------------


def rabbitmqctl(command: str, *args: str, check: bool = True) -> None:
    """`rabbitmqctl COMMAND -p <the suite's vhost> ARGS`."""
    vhost = unquote(urlsplit(AMQP_URL).path[1:]) or "/"
    subprocess.run(["rabbitmqctl", "-q", command, "-p", vhost, *args],
                   check=check, capture_output=True, timeout=60)  # fmt: skip


@pytest.fixture
async def full_queues(make_settings: MakeSettings) -> AsyncIterator[tuple[Settings, str]]:
    """Settings whose handler's partitions take no message while policy `name` is on: a
    queue-length limit of 0 that rejects publishes (the broker nacks them). Cleared after."""
    settings = make_settings(handlers=[billing()])
    name = f"relay-test-full-{uuid.uuid4().hex[:8]}"
    pattern = "^" + settings.handlers[0].queues[0].rsplit(".", 1)[0].replace(".", r"\.") + r"\."
    limit = '{"max-length": 0, "overflow": "reject-publish"}'
    await asyncio.to_thread(rabbitmqctl, "set_policy", "--apply-to", "queues", name, pattern, limit)
    try:
        yield settings, name
    finally:
        await asyncio.to_thread(rabbitmqctl, "clear_policy", name, check=False)


@pytest.mark.rabbit
@pytest.mark.timeout(20 + 10 + 2 * 60 + 20)  # accepted again, ready, rabbitmqctl twice, margin
async def test_a_nack_is_503_and_a_new_channel_publishes_once_the_limit_is_gone(
    full_queues: tuple[Settings, str], channel: AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A nacked channel is replaced at most once a second here (5 s in production)
    monkeypatch.setattr(publisher, "RENEW_AFTER_NACK_SECONDS", 1.0)
    settings, policy = full_queues
    async with running_ingress(settings) as ingress:
        # Given partitions that reject publishes once full (a quorum queue takes a message or
        # two before its limit applies): the broker nacks, the provider gets 503
        queued = 0
        while True:
            body = signed_body(settings.sources[0], activity(InvoiceId=7))
            status, answer, headers = await ingress.post(PATH, body)
            if status != 200:
                break
            queued += 1
            assert queued < 10, "the limit never applied"
        assert (status, answer) == (503, {"error": "broker refused the message (nack)"})
        assert int(headers["Retry-After"]) > 0

        # When the limit is removed (a quorum queue may go on rejecting the channel it rejected)
        await asyncio.to_thread(rabbitmqctl, "clear_policy", policy)

        # Then the provider's retry is accepted, within a few renewals, and the webhook queued
        async def accepted() -> bool:
            return (await ingress.post(PATH, body))[0] == 200

        await eventually(accepted, timeout=20, interval=0.5, what="accepted again")
        assert await partitions_depth(channel, settings) == queued + 1


# --- a publish timeout, then the provider's retry ------------------------------------------


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_retry_after_a_publish_timeout_is_accepted_and_queued_at_most_twice(
    make_settings: MakeSettings, proxy: TcpProxy, channel: AbstractChannel
) -> None:
    settings = make_settings(
        handlers=[billing()], url=proxy.url(), broker={"publish_timeout_seconds": 0.5}
    )
    async with running_ingress(settings) as ingress:
        # Given a broker whose confirms stop arriving: the webhook is answered 503
        body = signed_body(settings.sources[0], activity(InvoiceId=8))
        proxy.stalled.set()
        status, answer, _ = await ingress.post(PATH, body)
        assert (status, answer) == (503, {"error": "no confirm within the publish timeout"})

        # When the confirms flow again and the provider sends the same webhook again
        proxy.stalled.clear()
        status, answer, _ = await ingress.post(PATH, body)

    # Then it is accepted (not "duplicate": the first publish was never confirmed)
    assert status == 200
    assert answer["status"] == "accepted"
    # and queued once or twice (the first publish may have reached the queue), never lost
    assert await partitions_depth(channel, settings) in (1, 2)


# --- repeats at the ingress ------------------------------------------------------------------


async def test_an_id_accepted_before_is_answered_duplicate_and_not_published_again() -> None:
    settings = config_from_dict(settings_dict("window", handlers=[], url=AMQP_URL))
    bodies = [signed_body(settings.sources[0], activity(Id=9000 + i)) for i in range(3)]
    fake = FakePublisher()
    async with running_ingress(settings, publisher=fake) as ingress:
        answers = [(await ingress.post(PATH, b))[1]["status"] for b in bodies]
        again = [(await ingress.post(PATH, b))[1]["status"] for b in (bodies[2], bodies[0])]

    assert answers == ["accepted"] * 3
    assert again == ["duplicate", "duplicate"]
    assert [e.message_id for e in fake.published] == [
        "envoice:9000", "envoice:9001", "envoice:9002"
    ]  # fmt: skip


# --- SIGTERM with work in flight ------------------------------------------------------------


@pytest.mark.rabbit
@pytest.mark.timeout(4 * STARTUP_SECONDS + EXIT_SECONDS + DELIVERY_SECONDS + 20)
async def test_a_worker_sigtermed_mid_delivery_exits_0_and_the_next_delivers_in_order(
    relay: Relay, http_handler: HttpHandler
) -> None:
    # Given a worker delivering to a slow handler (0.3 s a request), 100 webhooks accepted
    http_handler.latency = 0.3
    config = relay.config(billing(http_handler.url, partitions=4))
    _, worker = await relay.start(config)
    sender = EnvoiceSender.to(config)
    await sender.send(INVOICES, each=10)

    # When it gets SIGTERM with deliveries in flight
    await eventually(lambda: len(http_handler.requests) >= 10, what="deliveries under way")
    in_flight = sum(r.status is None for r in http_handler.requests)
    assert in_flight > 0
    # Then it finishes them or returns them, and exits 0 (within the handler's timeout)
    assert await worker.terminate() == 0
    assert worker.logged("worker stopped") == 1
    # and a new worker delivers the rest, each invoice's in order, repeating at most those
    await relay.worker(config)
    tally = await sender.ledger.delivered(
        lambda: http_deliveries(http_handler), config.settings, timeout=DELIVERY_SECONDS
    )
    print(f"tally: {tally.line()}; in flight at SIGTERM: {in_flight}")
    assert tally.ok, str(tally)
    assert tally.duplicates <= in_flight


@pytest.mark.rabbit
@pytest.mark.timeout(3 * STARTUP_SECONDS + EXIT_SECONDS + DELIVERY_SECONDS + 20)
async def test_an_ingress_sigtermed_with_publishes_in_flight_loses_none_it_accepted(
    relay: Relay, http_handler: HttpHandler
) -> None:
    # Given relay's processes and a provider sending 10 invoices' webhooks at once
    config = relay.config(billing(http_handler.url))
    ingress, _ = await relay.start(config)
    sender = EnvoiceSender.to(config, retry_seconds=0.05)
    stop = asyncio.Event()
    async with in_background(sender.send(INVOICES, stop=stop)):
        await eventually(lambda: len(sender.ledger) >= 100, what="100 accepted")
        # When the ingress gets SIGTERM mid-stream
        assert await ingress.terminate() == 0
        stop.set()
    # Then it drained and exited 0; every webhook it answered 200 is delivered, in order
    assert ingress.logged("ingress draining") == 1
    tally = await sender.ledger.delivered(
        lambda: http_deliveries(http_handler), config.settings, timeout=DELIVERY_SECONDS
    )
    print(f"tally: {tally.line()}; answers {dict(sender.answers)}")
    assert tally.ok, str(tally)
    assert tally.duplicates == 0
    # and no log line of either process holds the source's secret
    for process in relay.processes:
        assert SECRET not in process.output()
