"""Faults: `relay ingress` and `relay worker` processes killed, the broker stopped, handlers
hanging or raising, while webhooks flow. Each test proves nothing accepted is lost or reordered:
every webhook answered 200 is delivered at least once, each invoice's in acceptance order
(duplicates are allowed, and counted: see `Ledger.check`)."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from relay.settings import Settings
from tests.conftest import AMQP_URL, MakeSettings, Publish
from tests.handlers_for_tests import BROKEN_ENV, HANG, JOURNAL_ENV, HttpHandler
from tests.processes import (
    STARTUP_SECONDS,
    Broker,
    Deliveries,
    EnvoiceSender,
    Relay,
    RelayProcess,
    billing_handler,
    http_deliveries,
    in_background,
    ingress_ready,
)
from tests.support import ROOT, eventually, new_event

pytestmark = [pytest.mark.rabbit, pytest.mark.fault]

INVOICES = range(1, 11)
DELIVERY_SECONDS = 45.0  # for everything accepted to be delivered after a fault
# Each test's timeout is the sum of the waits it may go through, so that a slow machine gets
# the ledger's report, not a bare timeout:
START = 2 * STARTUP_SECONDS  # relay.start: the ingress ready, then the workers consuming
POLL = 10.0  # eventually()'s default deadline
MARGIN = 20.0  # the rest: sending, fixtures


def partitions_delivered_by(worker: RelayProcess) -> set[str]:
    return {entry["partition"] for entry in worker.events("delivered")}


async def delivered_in_order(
    sender: EnvoiceSender,
    deliveries: Callable[[], Deliveries],
    settings: Settings,
    *,
    duplicates: int,
) -> None:
    """Waits until everything accepted is delivered and the partitions of `settings` are empty
    (no repeat can come after); asserts nothing was lost or reordered and at most `duplicates`
    deliveries were repeats (late repeats are reported apart)."""
    tally = await sender.ledger.delivered(deliveries, settings, timeout=DELIVERY_SECONDS)
    print(f"tally: {tally.line()}")  # shown with `pytest -rP`
    assert tally.ok, str(tally)
    assert tally.duplicates <= duplicates, str(tally)


@pytest.mark.timeout(START + POLL + STARTUP_SECONDS + DELIVERY_SECONDS + MARGIN)
async def test_a_worker_killed_mid_delivery_then_restarted_loses_and_reorders_nothing(
    relay: Relay, http_handler: HttpHandler
) -> None:
    # Given relay's processes and a slow HTTP handler (30 ms a request) with 4 partitions
    http_handler.latency = 0.03
    config = relay.config(billing_handler(http_handler))
    _, worker = await relay.start(config)
    # and 300 webhooks accepted, 30 for each of 10 invoices
    sender = EnvoiceSender.to(config)
    await sender.send(INVOICES, each=30)
    assert len(sender.ledger) == 300

    # When the worker is killed (-9) once about half are delivered, and a new one started
    await eventually(lambda: len(list(http_deliveries(http_handler))) >= 150, interval=0.01)
    await worker.kill()
    await relay.worker(config)

    # Then every accepted webhook is delivered, each invoice's in order
    # repeating at most, per invoice, the webhook in flight at the kill (the crash window:
    # docs/GUARANTEES.md; one whose ack the broker had not applied is not delivered again)
    await delivered_in_order(
        sender, lambda: http_deliveries(http_handler), config.settings, duplicates=len(INVOICES)
    )
    # and the kill caught deliveries in flight: they came back, as later attempts
    assert any(r.attempt > 1 for r in http_handler.requests)


@pytest.mark.timeout(START + POLL + DELIVERY_SECONDS + MARGIN)
async def test_when_the_active_worker_is_killed_the_other_takes_over_its_partitions(
    relay: Relay, http_handler: HttpHandler
) -> None:
    # Given two workers on a slow HTTP handler with 2 partitions
    http_handler.latency = 0.03
    config = relay.config(billing_handler(http_handler, partitions=2))
    _, *workers = await relay.start(config, workers=2)
    # and 200 webhooks accepted
    sender = EnvoiceSender.to(config)
    await sender.send(INVOICES, each=20)

    # When about a third is delivered, each partition by one worker only (single active consumer)
    await eventually(lambda: len(list(http_deliveries(http_handler))) >= 70, interval=0.01)
    active, standby = sorted(workers, key=lambda w: w.logged("delivered"), reverse=True)
    taken = partitions_delivered_by(active)
    assert taken
    assert not taken & partitions_delivered_by(standby)
    # and the worker delivering (the most) is killed (-9)
    await active.kill()

    # Then the other takes over its partitions and delivers everything, each invoice in order
    # repeating at most, per invoice, the webhook in flight at the kill (the crash window:
    # docs/GUARANTEES.md; one whose ack the broker had not applied is not delivered again)
    await delivered_in_order(
        sender, lambda: http_deliveries(http_handler), config.settings, duplicates=len(INVOICES)
    )
    assert taken & partitions_delivered_by(standby)


@pytest.mark.timeout(
    START + 2 * POLL + Broker.STOP_SECONDS + Broker.START_SECONDS + 30 + DELIVERY_SECONDS + MARGIN
)
async def test_worker_and_ingress_reconnect_by_themselves_after_a_broker_restart(
    relay: Relay, broker: Broker, http_handler: HttpHandler
) -> None:
    # Given relay's processes, a slow HTTP handler and 300 webhooks accepted
    http_handler.latency = 0.02
    config = relay.config(billing_handler(http_handler))
    ingress, worker = await relay.start(config)
    sender = EnvoiceSender.to(config)
    await sender.send(INVOICES, each=30)

    # When the broker app stops once about a third is delivered
    await eventually(lambda: len(list(http_deliveries(http_handler))) >= 100, interval=0.01)
    await broker.stop()
    # and, once both processes have seen their connection go, starts again
    await eventually(
        lambda: all(p.logged("broker connection lost") for p in (ingress, worker)),
        what="connections lost",
    )
    await broker.start()

    # Then the ingress is ready again by itself and accepts more webhooks
    await eventually(lambda: ingress_ready(ingress, config), timeout=30, what="ingress ready")
    await sender.send(INVOICES, each=5)
    # and every accepted webhook is delivered, each invoice's in order
    # repeating at most, per invoice, the delivery in flight when the broker stopped (the crash
    # window)
    await delivered_in_order(
        sender, lambda: http_deliveries(http_handler), config.settings, duplicates=len(INVOICES)
    )
    assert worker.logged("broker connected") >= 2


@pytest.mark.timeout(
    START + 2 * POLL + Broker.STOP_SECONDS + Broker.START_SECONDS + 60 + DELIVERY_SECONDS + MARGIN
)
async def test_webhooks_sent_through_a_broker_outage_are_refused_or_delivered_in_order(
    relay: Relay, broker: Broker, http_handler: HttpHandler
) -> None:
    # Given relay's processes, and a provider sending 60 webhooks for each of 10 invoices, about
    # 20 ms apart, sending again later what is not accepted
    config = relay.config(billing_handler(http_handler))
    ingress, _ = await relay.start(config)
    sender = EnvoiceSender.to(config, pause_seconds=0.02, retry_seconds=0.1)
    async with in_background(sender.send(INVOICES, each=60)) as sending:
        # When the broker app stops once a third is accepted
        await eventually(lambda: len(sender.ledger) >= 200, interval=0.01, what="200 accepted")
        await broker.stop()
        # and starts again once the ingress has refused webhooks for a while
        await eventually(lambda: sender.refused >= 20, what="webhooks refused")
        accepted_before = len(sender.ledger)
        await broker.start()
        await asyncio.wait_for(sending, 60)

    # Then webhooks were refused with 503 during the outage, and accepted again after it
    print(f"ingress answers: {dict(sender.answers)}")
    assert sender.answers["503"] > 0
    assert len(sender.ledger) == 600 > accepted_before
    assert ingress.logged("broker connected") >= 2
    # and everything accepted is delivered, each invoice's in order
    # repeating at most, per invoice, a delivery in flight at the stop (the crash window); a
    # webhook refused with 503 that the ingress had published before its confirm was lost
    # reaches the handler once
    await delivered_in_order(
        sender, lambda: http_deliveries(http_handler), config.settings, duplicates=len(INVOICES)
    )


@pytest.mark.timeout(START + POLL + DELIVERY_SECONDS + MARGIN)
async def test_a_handler_hanging_past_its_timeout_is_retried_while_its_partition_waits(
    relay: Relay, http_handler: HttpHandler
) -> None:
    # Given an HTTP handler with one partition and a 0.5 s timeout, that hangs for now
    config = relay.config(billing_handler(http_handler, partitions=1, timeout_seconds=0.5))
    await relay.start(config)
    http_handler.default = HANG
    # When 50 webhooks are accepted
    sender = EnvoiceSender.to(config)
    await sender.send(INVOICES, each=5)
    # and the handler works again after hanging on 3 requests
    await eventually(lambda: len(http_handler.requests) >= 3, what="3 requests")
    http_handler.default = 200

    # Then everything is delivered, each invoice's in order
    # with no repeat: a try that hung is not a delivery
    await delivered_in_order(
        sender, lambda: http_deliveries(http_handler), config.settings, duplicates=0
    )
    # after the head of each invoice that hung was tried again, each try after the timeout,
    # while no later webhook of its invoice was tried
    firsts = {ids[0] for ids in sender.ledger.accepted.values()}
    tries = [r for r in http_handler.requests if not r.accepted]
    assert len(tries) >= 3
    assert {r.id for r in tries} <= firsts
    for head in {r.id for r in tries}:
        attempts = http_handler.of(head)
        assert len(attempts) >= 2  # it hung, then it was tried again
        assert [r.attempt for r in attempts] == list(range(1, len(attempts) + 1))
        assert all(b.at - a.at >= 0.5 for a, b in itertools.pairwise(attempts))


def journal_calls(path: Path, *, ok: bool) -> list[dict[str, Any]]:
    """The calls `journal` recorded that succeeded (`ok`) or raised."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]  # the last one may be half written
    return [call for call in map(orjson.loads, lines) if call["ok"] is ok]


def journal_deliveries(path: Path) -> Deliveries:
    return [(call["key"], call["id"]) for call in journal_calls(path, ok=True)]


@pytest.mark.timeout(START + POLL + DELIVERY_SECONDS + MARGIN)
async def test_a_python_handler_raising_for_a_while_gets_everything_in_order(
    relay: Relay, tmp_path: Path
) -> None:
    # Given a Python handler with 2 partitions that raises for now
    journal, broken = tmp_path / "journal.jsonl", tmp_path / "broken"
    broken.touch()
    config = relay.config(
        {"name": "books", "events": ["envoice.#"], "call": "tests.handlers_for_tests:journal",
         "partitions": 2, "max_attempts": 3, "backoff_initial_ms": 50, "backoff_max_ms": 500}
    )  # fmt: skip
    await relay.start(config, env={JOURNAL_ENV: str(journal), BROKEN_ENV: str(broken)})
    # When 60 webhooks are accepted
    sender = EnvoiceSender.to(config)
    await sender.send(INVOICES, each=6)
    # and the handler has raised 8 times
    await eventually(lambda: len(journal_calls(journal, ok=False)) >= 8, what="8 failures")

    # Then only the head of each invoice was tried: its first webhook
    failed = {call["id"] for call in journal_calls(journal, ok=False)}
    firsts = {ids[0] for ids in sender.ledger.accepted.values()}
    assert failed <= firsts

    # When the handler works again
    broken.unlink()
    # Then everything is delivered, each invoice's in order
    # with no repeat: a call that raised is not a delivery
    await delivered_in_order(
        sender, lambda: journal_deliveries(journal), config.settings, duplicates=0
    )


SOAK_LINE = re.compile(
    r"^accepted=(\d+) delivered=(\d+) lost=(\d+) reordered=(\d+) duplicates=(\d+) "
    r"late_repeats=(\d+) max_duplicates=(\d+) faults=kill:(\d+),broker:(\d+),handler:(\d+) "
    r"faults_failed=(\d+)$"
)


@pytest.mark.timeout(420)
async def test_soak_short(broker: Broker) -> None:
    # Given the soak (its own relay processes, handlers and faults) for half a minute
    soak = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.soak", "--minutes", "0.5", "--seed", "7",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(soak.communicate(), 360)
    finally:
        if soak.returncode is None:  # interrupted: the soak restores the broker on SIGINT
            soak.send_signal(signal.SIGINT)
            await asyncio.wait_for(soak.wait(), 50)
    print(stderr.decode())

    # Then it ends by itself with one line
    lines = stdout.decode().splitlines()
    assert len(lines) == 1, lines
    match = SOAK_LINE.match(lines[0])
    assert match, lines
    print(lines[0])
    accepted, delivered, lost, reordered, duplicates, _, most, *faults, failed = map(
        int, match.groups()
    )
    # every kind of fault happened, none failed
    assert all(n >= 1 for n in faults), lines[0]
    assert failed == 0
    # nothing lost, nothing reordered, no more repeats than the faults explain
    assert (lost, reordered) == (0, 0), lines[0]
    assert accepted == delivered > 0
    assert duplicates <= most
    assert soak.returncode == 0


async def partition_of_keys(settings: Settings) -> dict[str, str]:
    """Drains the handler's partitions; which partition each ordering key was in."""
    found: dict[str, str] = {}
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        for queue_name in settings.handlers[0].queues:
            queue = await channel.declare_queue(queue_name, passive=True)
            for _ in range(queue.declaration_result.message_count or 0):
                async with queue.iterator() as messages:
                    message = await anext(messages)
                    found[str((message.headers or {})["x-relay-key"])] = queue_name
                    await message.ack()
    return found


@pytest.mark.timeout(Broker.STOP_SECONDS + 2 * Broker.START_SECONDS + MARGIN)
async def test_a_key_stays_in_its_partition_across_a_broker_restart(
    make_settings: MakeSettings, publish: Publish
) -> None:
    # Given 40 invoices' events spread over 4 partitions (no worker consuming)
    settings = make_settings(
        handlers=[{"name": "h", "events": ["envoice.#"], "url": "http://127.0.0.1:1/"}]
    )
    invoices = range(1, 41)
    await publish(settings, *(new_event(settings, i) for i in invoices))
    before = await partition_of_keys(settings)
    assert len(before) == len(invoices)
    assert len(set(before.values())) == 4

    # When the broker restarts and the same invoices send again
    broker = Broker()
    try:
        await broker.stop()
        await broker.start()
    finally:
        await broker.restore()
    await publish(settings, *(new_event(settings, i) for i in invoices))

    # Then every key is in the partition it was in before: older messages of a key waiting in
    # one queue are never overtaken by newer ones in another
    assert await partition_of_keys(settings) == before
