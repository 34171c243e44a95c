"""examples/invoice_store: relay's HTTP deliveries of Envoice activities, sent by relay's own
delivery code (HttpTarget: Standard Webhooks headers and signature) to the store's app on a
loopback port, applied once and in order to a temporary SQLite file, and to PostgreSQL when
RELAY_TEST_POSTGRES_URL is set. No broker: the messages are built by relay's own wire code."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from examples.invoice_store import Applied, Invoice, Store, make_app
from examples.invoice_store.store import PostgresStore, SqliteStore
from relay import wire
from relay.config import from_dict as config_from_dict
from relay.providers import Request, envoice
from relay.secrets import Secret, standard_webhooks_key
from relay.settings import HandlerSettings
from relay.signatures import standard_webhooks_signature
from relay.worker.delivery import HttpTarget, Outcome, Verdict
from tests.support import ROOT, activity, eventually, missing_tool, signed_body

pytestmark = pytest.mark.timeout(30)

SECRET = "whsec_" + base64.b64encode(b"invoice-store-test-signing-key-1").decode()
SOURCE = config_from_dict(
    {"sources": [{"name": "envoice", "path": "/e", "scheme": "envoice", "secrets": ["s3cret"]}]}
).sources[0]
POSTGRES_URL_ENV = "RELAY_TEST_POSTGRES_URL"


@dataclass(frozen=True, slots=True)
class Message:
    """A webhook message as relay delivers it: the envelope and its id."""

    body: bytes
    id: str


def message(**fields: Any) -> Message:
    """relay's message for an Envoice activity (Paid on invoice 42 unless told), built as the
    ingress builds it: a signed webhook parsed by the envoice scheme, then wire.envelope."""
    webhook = Request(signed_body(SOURCE, activity(**fields)), {"Content-Type": "application/json"})
    event = envoice.parse(webhook, SOURCE, time.time())
    return Message(wire.envelope(event, datetime.now(UTC)), event.message_id)


@dataclass
class Service:
    """The store's app on a loopback port, and relay's HTTP delivery to it."""

    store: Store
    url: str
    session: aiohttp.ClientSession

    async def deliver(
        self, message: Message, *, attempt: int = 1, replay: str = "", secret: str = SECRET
    ) -> Outcome:
        handler = HandlerSettings(
            name="invoices", events=("envoice.#",), url=self.url, signing_secret=Secret(secret)
        )
        target = HttpTarget(handler, self.session)
        return await target.deliver(message.body, message.id, attempt, replay)

    async def post(self, body: bytes, webhook_id: str, **headers: str) -> int:
        """POST `body` signed as relay signs, with `headers` on top; the answer's status."""
        timestamp = int(time.time())
        signature = standard_webhooks_signature(
            standard_webhooks_key(Secret(SECRET)), webhook_id, timestamp, body
        )
        sent = {
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
            **headers,
        }
        async with self.session.post(self.url, data=body, headers=sent) as response:
            return response.status


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set: the PostgreSQL store is not tested")
    return url


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a store keeps its tables: a new SQLite file, or a new schema of the PostgreSQL
    database at $RELAY_TEST_POSTGRES_URL (dropped after)."""
    if request.param == "sqlite":
        yield str(tmp_path / "invoices.sqlite3")
        return
    url = postgres_url()
    import psycopg  # the optional extra `examples`: needed once the URL is set

    schema = f"invoice_store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            joiner = "&" if "?" in url else "?"
            yield f"{url}{joiner}options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    store: Store = (
        PostgresStore(database) if database.startswith("postgresql") else SqliteStore(database)
    )
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def service(store: Store, session: aiohttp.ClientSession) -> AsyncIterator[Service]:
    server = TestServer(make_app(store, SECRET), host="127.0.0.1")
    await server.start_server()
    try:
        yield Service(store, str(server.make_url("/hooks")), session)
    finally:
        await server.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


BOTH = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
SQLITE = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


# --- applying ---------------------------------------------------------------------------------


@BOTH
async def test_a_signed_delivery_is_applied_to_its_invoice(service: Service) -> None:
    paid = message(Id=9001, Type=11, InvoiceId=42, CreatedOn="2026-11-28T11:59:59.9Z")

    outcome = await service.deliver(paid)

    assert (outcome.verdict, outcome.status) == (Verdict.SUCCESS, 200)
    [row] = await service.store.rows()
    assert row == Invoice(
        invoice_id=42,
        invoice_number="INV-42",
        status="paid",
        link="https://app.envoice.example/invoices/42",
        last_event="paid",
        last_type=11,
        last_activity_id=9001,
        last_activity_at="2026-11-28T11:59:59.9Z",
        last_message="Invoice paid",
        activities=1,
        updated_at=row.updated_at,
    )
    assert datetime.fromisoformat(row.updated_at) <= datetime.now(UTC)  # relay's received_at
    assert await service.store.applied() == [Applied("envoice:9001", 42, 9001, 1, 0)]


@SQLITE
@pytest.mark.parametrize(
    "secret",
    [SECRET, base64.b64encode(b"a plain base64 secret, no prefix").decode()],
    ids=["whsec", "plain-base64"],
)
async def test_either_form_of_signing_secret_verifies(
    store: Store, session: aiohttp.ClientSession, secret: str
) -> None:
    server = TestServer(make_app(store, secret), host="127.0.0.1")
    await server.start_server()
    try:
        service = Service(store, str(server.make_url("/hooks")), session)

        outcome = await service.deliver(message(), secret=secret)

        assert outcome.status == 200
        assert len(await store.rows()) == 1
    finally:
        await server.close()


@SQLITE
async def test_an_activity_about_no_invoice_is_recorded_and_changes_no_row(
    service: Service,
) -> None:
    order = message(Id=77, Type=29, InvoiceId=0, InvoiceNumber="", OrderId=5, OrderNumber="O-5")

    first, again = await service.deliver(order), await service.deliver(order, attempt=2)

    assert (first.status, again.status) == (200, 200)
    assert await service.store.rows() == []
    assert await service.store.applied_counts() == {"envoice:77": 2}


# --- refusing ---------------------------------------------------------------------------------


@SQLITE
async def test_a_bad_signature_is_answered_401_and_changes_nothing(service: Service) -> None:
    other = "whsec_" + base64.b64encode(b"not the store's signing key 1234").decode()
    paid = message()

    wrong_secret = await service.deliver(paid, secret=other)
    unsigned = await service.post(paid.body, paid.id, **{"webhook-signature": ""})
    tampered = await service.post(paid.body, paid.id, **{"webhook-id": "envoice:1"})
    ten_minutes_ago = str(int(time.time()) - 600)
    stale = await service.post(paid.body, paid.id, **{"webhook-timestamp": ten_minutes_ago})

    assert (wrong_secret.verdict, wrong_secret.status) == (Verdict.PERMANENT, 401)
    assert (unsigned, tampered, stale) == (401, 401, 401)
    assert await service.store.rows() == []
    assert await service.store.applied() == []


@SQLITE
@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"id": "envoice:5", "event": "paid", "received_at": "2026-11-28T12:00:00Z"}',
        b'{"id": "envoice:5", "event": "paid", "received_at": "2026-11-28T12:00:00Z",'
        b' "data": {"Id": "5", "CreatedOn": "2026-11-28T11:59:59Z"}}',
        b'{"id": "envoice:6", "event": "paid", "received_at": "2026-11-28T12:00:00Z",'
        b' "data": {"Id": 6, "CreatedOn": "2026-11-28T11:59:59Z"}}',  # not the webhook-id
    ],
    ids=["not-json", "not-an-object", "no-data", "id-a-string", "another-id"],
)
async def test_a_body_that_is_not_an_envoice_envelope_is_answered_400(
    service: Service, body: bytes
) -> None:
    status = await service.post(body, "envoice:5")

    assert status == 400
    assert await service.store.applied() == []


# --- once and in order ------------------------------------------------------------------------


@BOTH
async def test_a_repeat_of_a_webhook_id_is_applied_once_and_counted(service: Service) -> None:
    paid = message(Id=501, InvoiceId=42)

    outcomes = [await service.deliver(paid, attempt=n) for n in (1, 2, 3)]

    assert [o.status for o in outcomes] == [200, 200, 200]
    [row] = await service.store.rows()
    assert (row.activities, row.last_activity_id) == (1, 501)
    assert await service.store.applied() == [Applied("envoice:501", 42, 501, 1, 2)]
    assert await service.store.applied_counts() == {"envoice:501": 3}


@BOTH
async def test_activities_of_an_invoice_applied_in_order_give_its_final_state(
    service: Service,
) -> None:
    # Given each invoice's history (Type codes: Created 0, SentViaEmail 3, Viewed 8,
    # Overdue 13, NewPaymentWithStripe 16)
    histories = {
        42: [(1, 0), (2, 3), (3, 8), (4, 13), (5, 16)],
        43: [(11, 0), (12, 3), (13, 8)],
        44: [(21, 0), (22, 3), (23, 13)],
    }

    # When relay delivers each invoice's activities in order, the invoices at once
    async def deliver_history(invoice: int) -> None:
        for activity_id, code in histories[invoice]:
            created = f"2026-11-28T12:00:{activity_id:02d}.1234567Z"
            sent = message(Id=activity_id, Type=code, InvoiceId=invoice,
                           InvoiceNumber=f"INV-{invoice}", CreatedOn=created)  # fmt: skip
            assert (await service.deliver(sent)).status == 200

    await asyncio.gather(*(deliver_history(invoice) for invoice in histories))

    # Then each row is the invoice's state after its last activity
    rows = {row.invoice_id: row for row in await service.store.rows()}
    summary = {
        i: (r.status, r.last_event, r.last_activity_id, r.last_activity_at, r.activities)
        for i, r in rows.items()
    }
    assert summary == {
        42: ("paid", "new_payment_with_stripe", 5, "2026-11-28T12:00:05.1234567Z", 5),
        43: ("sent", "viewed", 13, "2026-11-28T12:00:13.1234567Z", 3),  # viewed keeps "sent"
        44: ("overdue", "overdue", 23, "2026-11-28T12:00:23.1234567Z", 3),
    }
    # and each activity was applied once, at its place in its invoice's history
    applied = await service.store.applied()
    assert [(a.invoice_id, a.activity_id, a.position, a.repeats) for a in applied] == [
        (invoice, activity_id, place, 0)
        for invoice, history in histories.items()
        for place, (activity_id, _) in enumerate(history, start=1)
    ]


@BOTH
async def test_replayed_deliveries_are_still_idempotent(service: Service) -> None:
    # Given three activities of invoice 42 applied
    history = [message(Id=n, Type=code, InvoiceId=42) for n, code in ((31, 3), (32, 13), (33, 11))]
    for sent in history:
        await service.deliver(sent)
    before = await service.store.rows()

    # When relay replays them all (`relay replay`: the same webhook-id, and x-relay-replayed)
    replays = [await service.deliver(sent, replay="6dd6017fb72f") for sent in history]

    # Then they change nothing but their repeat counts
    assert [o.status for o in replays] == [200, 200, 200]
    assert await service.store.rows() == before
    assert await service.store.applied_counts() == {"envoice:31": 2, "envoice:32": 2,
                                                    "envoice:33": 2}  # fmt: skip

    # When a dead letter the store never applied comes back (`relay dlq replay`)
    dead_letter = await service.deliver(message(Id=34, Type=12, InvoiceId=42), replay="true")

    # Then it is applied, after the others
    assert dead_letter.status == 200
    [row] = await service.store.rows()
    assert (row.status, row.last_activity_id, row.activities) == ("unpaid", 34, 4)
    assert (await service.store.applied())[-1] == Applied("envoice:34", 42, 34, 4, 0)


# --- the database unavailable -----------------------------------------------------------------


@SQLITE
async def test_a_locked_database_is_answered_503_and_relays_retry_is_applied(
    database: str, session: aiohttp.ClientSession
) -> None:
    store = SqliteStore(database, busy_timeout=0.1)
    await store.open()
    server = TestServer(make_app(store, SECRET), host="127.0.0.1")
    await server.start_server()
    other = sqlite3.connect(database, isolation_level=None)
    try:
        service = Service(store, str(server.make_url("/hooks")), session)
        paid = message(Id=601)
        # Given another process holding the database's write lock
        other.execute("BEGIN EXCLUSIVE")

        # When relay delivers, then retries once the lock is gone
        locked = await service.deliver(paid)
        other.execute("ROLLBACK")
        retried = await service.deliver(paid, attempt=2)

        # Then the first try is transient for relay, and the retry is applied once
        assert (locked.verdict, locked.status) == (Verdict.TRANSIENT, 503)
        assert (retried.verdict, retried.status) == (Verdict.SUCCESS, 200)
        assert await store.applied_counts() == {"envoice:601": 1}
    finally:
        other.close()
        await server.close()
        await store.close()


async def test_an_unreachable_postgresql_is_answered_503(session: aiohttp.ClientSession) -> None:
    if importlib.util.find_spec("psycopg") is None:
        missing_tool("psycopg (the optional extra `examples`) is not installed")
    store = PostgresStore(f"postgresql://relay@127.0.0.1:{free_port()}/invoices", connect_timeout=2)
    server = TestServer(make_app(store, SECRET), host="127.0.0.1")
    await server.start_server()
    try:
        service = Service(store, str(server.make_url("/hooks")), session)

        outcome = await service.deliver(message())

        assert (outcome.verdict, outcome.status) == (Verdict.TRANSIENT, 503)
    finally:
        await server.close()
        await store.close()


# --- python -m examples.invoice_store ---------------------------------------------------------


async def test_the_module_runs_the_store_and_stops_on_sigterm(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    port, db = free_port(), tmp_path / "invoices.sqlite3"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.invoice_store", "--port", str(port), "--db", str(db),
        "--secret", "env:INVOICE_STORE_SECRET",
        cwd=ROOT, env={**os.environ, "INVOICE_STORE_SECRET": SECRET},
    )  # fmt: skip
    try:
        service = Service(SqliteStore(str(db)), f"http://127.0.0.1:{port}/hooks", session)

        async def answers() -> bool:
            return (await service.deliver(message(Id=701))).status == 200

        await eventually(answers, timeout=15, what="the store answering 200")
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
        await service.store.open()
        assert [row.last_activity_id for row in await service.store.rows()] == [701]
        await service.store.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
