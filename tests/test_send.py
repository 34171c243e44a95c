"""`relay send` as a provider: a recorded history, its catch-up, retries and the outage catch-up,
against a fake ingress on 127.0.0.1 (no RabbitMQ)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.config import from_dict as config_from_dict
from relay.errors import RequestError
from relay.ops.send import SendReport, send
from relay.providers import PROVIDERS, Request
from relay.settings import SourceSettings
from tests.support import eventually, relay_command, run_relay

SECRET = "test-secret"
ENVOICE = config_from_dict(
    {"sources": [{"name": "envoice", "path": "/e", "scheme": "envoice", "secrets": [SECRET]}]}
).sources[0]
GOT_THROUGH = ("accepted", "duplicate")


@dataclass(frozen=True, slots=True)
class Received:
    id: str  # the event id as the ingress reads it
    key: str  # the ordering key ("invoice:2")
    answer: str  # "accepted", "duplicate", "503", "400"
    data: bytes  # the payload exactly as sent (Envoice: the Activity)


@dataclass(slots=True)
class FakeIngress:
    """An ingress as `relay send` sees one: it verifies and reads each webhook with the source's
    scheme, records it, and answers accepted the first time an id comes, duplicate after; 503
    to the requests numbered in `fail` (from 1) and, while `fail_from` is set, to every one from
    that number on."""

    source: SourceSettings
    url: str = ""
    received: list[Received] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    fail: set[int] = field(default_factory=set)
    fail_from: int | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        number = len(self.received) + 1
        try:
            event = PROVIDERS[self.source.scheme].parse(
                Request(body, request.headers), self.source, time.time()
            )
        except RequestError as exc:
            self.received.append(Received("?", "?", str(exc.status), body))
            return web.json_response({"error": exc.message}, status=exc.status)
        if number in self.fail or (self.fail_from is not None and number >= self.fail_from):
            self.received.append(Received(event.id, event.key, "503", event.data_json))
            return web.json_response(
                {"error": "broker unavailable"}, status=503, headers={"Retry-After": "1"}
            )
        answer = "duplicate" if event.id in self.seen else "accepted"
        self.seen.add(event.id)
        self.received.append(Received(event.id, event.key, answer, event.data_json))
        return web.json_response({"status": answer, "id": event.message_id})

    def keys_failed(self) -> set[str]:
        return {r.key for r in self.received if r.answer == "503"}


@asynccontextmanager
async def serve(source: SourceSettings) -> AsyncIterator[FakeIngress]:
    fake = FakeIngress(source)
    app = web.Application()
    app.router.add_post(source.path, fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = f"http://127.0.0.1:{server.port}{source.path}"
    try:
        yield fake
    finally:
        await server.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeIngress]:
    async with serve(ENVOICE) as running:
        yield running


def per_key(received: list[Received], *answers: str) -> dict[str, list[int]]:
    """Each key's event ids in the order received (only those answered `answers`, if given)."""
    found: dict[str, list[int]] = {}
    for r in received:
        if not answers or r.answer in answers:
            found.setdefault(r.key, []).append(int(r.id))
    return found


def ascending(ids: list[int]) -> bool:
    return ids == sorted(ids)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# --- a recorded history and its catch-up ------------------------------------------------------


@pytest.mark.timeout(30)
async def test_catch_up_sends_the_recorded_history_again_in_order_then_the_new_ones(
    fake: FakeIngress, tmp_path: Path
) -> None:
    # Given a history of 12 webhooks over 3 invoices, recorded as they were sent
    history = tmp_path / "history.jsonl"
    first = await send(ENVOICE, fake.url, count=12, invoices=3, first_id=1000, record=history)
    recorded = read_lines(history)
    original = {r.id: r.data for r in fake.received}
    fake.received.clear()

    # When it is sent again as a catch-up, with 6 new ones after it, recorded to the same file
    report = await send(ENVOICE, fake.url, count=6, invoices=3, first_id=2000, record=history,
                        catch_up=history)  # fmt: skip

    # Then the history says what was sent and how it was answered
    assert first.line() == "sent 12: 12 accepted"
    assert sorted(line["id"] for line in recorded) == list(range(1000, 1012))
    assert sorted(line["order"] for line in recorded) == list(range(1, 13))
    for line in recorded:
        assert set(line) == {"order", "id", "invoice", "key", "event", "occurred",
                             "occurred_at", "answer"}  # fmt: skip
        assert line["answer"] == "accepted"
        assert line["key"] == f"invoice:{line['invoice']}"
        assert line["invoice"] == 1 + (line["id"] - 1000) % 3
        assert orjson.loads(original[str(line["id"])])["CreatedOn"] == line["occurred_at"]
    # and the ingress got the past first, in the recorded order, each the same Activity again
    past, new = fake.received[:12], fake.received[12:]
    assert [int(r.id) for r in past] == [line["id"] for line in recorded]
    assert all(r.answer == "duplicate" for r in past)
    assert all(r.data == original[r.id] for r in past)
    # then the new ones, each invoice's in order, after all its past ones
    assert sorted(int(r.id) for r in new) == list(range(2000, 2006))
    assert all(r.answer == "accepted" for r in new)
    assert all(ascending(ids) for ids in per_key(fake.received).values())
    assert report.line() == "sent 18: 6 accepted, 12 duplicate"
    assert report.ok
    # and the file now holds the history with the new ones after it, numbered on
    grown = read_lines(history)
    assert grown[:12] == recorded
    assert sorted(line["order"] for line in grown[12:]) == list(range(13, 19))
    assert sorted(line["id"] for line in grown[12:]) == list(range(2000, 2006))


@pytest.mark.timeout(30)
async def test_a_catch_up_signs_afresh_what_the_scheme_signs_with_a_time(tmp_path: Path) -> None:
    # Given a Stripe source (a signed timestamp, 300 s tolerance) and a history an hour old
    stripe = config_from_dict(
        {
            "sources": [
                {"name": "stripe", "path": "/s", "scheme": "stripe", "secrets": ["whsec_test"]}
            ]
        }
    ).sources[0]
    an_hour_ago = time.time() - 3600
    history = tmp_path / "history.jsonl"
    history.write_bytes(b"".join(
        orjson.dumps({"order": n, "id": n, "invoice": n, "occurred": an_hour_ago + n}) + b"\n"
        for n in (1, 2, 3)
    ))  # fmt: skip

    # When it is sent again, and nothing new
    async with serve(stripe) as ingress:
        report = await send(stripe, ingress.url, count=0, invoices=1, catch_up=history)
        received = ingress.received

    # Then each passed the signature check, with the body the history describes
    assert report.line() == "sent 3: 3 accepted"
    assert [r.id for r in received] == ["evt_1", "evt_2", "evt_3"]
    assert [orjson.loads(r.data)["created"] for r in received] == [
        int(an_hour_ago + n) for n in (1, 2, 3)
    ]


# --- retries ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_without_retry_for_a_503_is_counted_and_the_sender_goes_on(
    fake: FakeIngress,
) -> None:
    fake.fail = {2}

    report = await send(ENVOICE, fake.url, count=4, invoices=1, first_id=1)

    assert report.line() == "sent 4: 1 HTTP 503, 3 accepted"
    assert not report.ok
    assert report.errors == ["503 broker unavailable"]
    assert [int(r.id) for r in fake.received] == [1, 2, 3, 4]


@pytest.mark.timeout(30)
async def test_retry_for_holds_each_invoice_back_through_an_outage(fake: FakeIngress) -> None:
    # Given an ingress that answers 503 to five requests in a row
    fake.fail = set(range(7, 12))

    # When 30 webhooks over 3 invoices are sent with retries
    report = await send(ENVOICE, fake.url, count=30, invoices=3, first_id=1, retry_for=20)

    # Then every one got in, once, each invoice's in order
    assert report.line() == "sent 30: 30 accepted (5 retried)"
    assert report.ok
    assert sorted(int(r.id) for r in fake.received if r.answer == "accepted") == list(range(1, 31))
    assert all(ascending(ids) for ids in per_key(fake.received, *GOT_THROUGH).values())
    # and nothing of an invoice went ahead of its webhook being retried
    for i, r in enumerate(fake.received):
        if r.answer == "503":
            after = next(later for later in fake.received[i + 1 :] if later.key == r.key)
            assert after.id == r.id


@pytest.mark.timeout(30)
async def test_retry_for_gives_up_after_its_time(fake: FakeIngress) -> None:
    fake.fail_from = 1  # down for good

    started = time.monotonic()
    report = await send(ENVOICE, fake.url, count=2, invoices=1, first_id=1, retry_for=0.3)

    assert report.answers == {"HTTP 503": 2}
    assert report.retries >= 4
    assert not report.ok
    assert time.monotonic() - started < 5
    assert [int(r.id) for r in fake.received] == sorted(int(r.id) for r in fake.received)


# --- the outage catch-up ----------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_outage_catch_up_sends_everything_past_again_in_order(fake: FakeIngress) -> None:
    # Given an ingress that answers 503 to the 5th, 6th and 7th requests
    fake.fail = {5, 6, 7}

    # When 10 webhooks of one invoice are sent as Envoice does
    report = await send(ENVOICE, fake.url, count=10, invoices=1, first_id=1, retry_for=20,
                        outage_catch_up=True)  # fmt: skip

    # Then the 5th was retried until it got in, then all so far came again, then the rest
    got = [(int(r.id), r.answer) for r in fake.received]
    assert got == [
        *((n, "accepted") for n in (1, 2, 3, 4)),
        *((5, "503") for _ in range(3)),
        (5, "accepted"),
        *((n, "duplicate") for n in (1, 2, 3, 4, 5)),
        *((n, "accepted") for n in (6, 7, 8, 9, 10)),
    ]
    assert report.line() == "sent 15: 10 accepted, 5 duplicate (3 retried, 1 outage catch-up(s))"
    assert report.ok


@pytest.mark.timeout(30)
async def test_outage_catch_up_over_several_invoices(fake: FakeIngress) -> None:
    # Given an ingress that goes down at its 10th request
    fake.fail_from = 10

    # When 30 webhooks over 3 invoices are sent as Envoice does
    sending = asyncio.create_task(
        send(
            ENVOICE, fake.url, count=30, invoices=3, first_id=1, retry_for=20, outage_catch_up=True
        )
    )
    # and the ingress comes back once every invoice has met the outage
    await eventually(lambda: len(fake.keys_failed()) == 3 or sending.done(), what="3 keys 503")
    fake.fail_from = None
    report: SendReport = await sending

    # Then one catch-up sent every webhook sent before it, alone, each invoice's in order
    assert report.catch_ups == 1
    last_failure = max(i for i, r in enumerate(fake.received) if r.answer == "503")
    window = catch_up_window(fake.received, last_failure + 1)
    assert window is not None, [(r.id, r.answer) for r in fake.received]
    assert all(r.answer in GOT_THROUGH for r in window)
    assert all(ascending(ids) for ids in per_key(window).values())
    # and every webhook got in once, each invoice's in order
    assert sorted(int(r.id) for r in fake.received if r.answer == "accepted") == list(range(1, 31))
    assert all(ascending(ids) for ids in per_key(fake.received, "accepted").values())
    assert report.answers["accepted"] == 30
    assert report.ok


def catch_up_window(received: list[Received], start: int) -> list[Received] | None:
    """The last run of requests from `start` on that holds each id received before it, once
    (an earlier one may match by chance: retries then the catch-up's first ones)."""
    found = None
    for s in range(start, len(received)):
        before = {r.id for r in received[:s]}
        window = received[s : s + len(before)]
        ids = [r.id for r in window]
        if len(ids) == len(set(ids)) and set(ids) == before:
            found = window
    return found


# --- the command ------------------------------------------------------------------------------


def write_config(tmp_path: Path) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[[sources]]\nname = "envoice"\npath = "/e"\nscheme = "envoice"\nsecrets = ["{SECRET}"]\n'
    )
    return str(path)


@pytest.mark.timeout(60)
async def test_relay_send_records_and_catches_up(fake: FakeIngress, tmp_path: Path) -> None:
    config, history = write_config(tmp_path), str(tmp_path / "history.jsonl")
    send_ = ("send", "--config", config, "--url", fake.url, "--invoices", "2")

    recorded = await relay_command(*send_, "--count", "4", "--first-id", "7", "--record", history)
    again = await relay_command(*send_, "--count", "0", "--catch-up", history)

    assert (recorded.returncode, recorded.stdout.strip()) == (0, "sent 4: 4 accepted")
    assert (again.returncode, again.stdout.strip()) == (0, "sent 4: 4 duplicate")
    assert [int(r.id) for r in fake.received[4:]] == [
        line["id"] for line in read_lines(Path(history))
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "No such file or directory"),
        (b'{"order": 1, "id": 1, "invoice": 1, "occurred": 1.5}\nnot json\n', "line 2: not JSON"),
        (b"[1, 2]\n", "line 1: not a JSON object"),
        (
            b'{"order": 1, "id": "1", "invoice": 1, "occurred": 1.5}\n',
            "line 1: 'id' missing or not an integer",
        ),
        (b'{"order": 1, "id": 1, "invoice": 1}\n', "line 1: 'occurred' missing or not a number"),
    ],
    ids=["missing", "not JSON", "not an object", "id a string", "no occurred"],
)
def test_a_bad_catch_up_file_exits_2_naming_the_problem(
    tmp_path: Path, content: bytes | None, error: str
) -> None:
    history = tmp_path / "history.jsonl"
    if content is not None:
        history.write_bytes(content)

    result = run_relay("send", "--config", write_config(tmp_path), "--catch-up", str(history),
                       "--url", "http://127.0.0.1:1/e")  # fmt: skip

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"relay: config error: --catch-up {history}")
    assert error in line
    assert result.stdout == ""


@pytest.mark.timeout(60)
def test_a_record_file_that_cannot_be_opened_exits_2(tmp_path: Path) -> None:
    history = tmp_path / "no-such-dir" / "history.jsonl"

    result = run_relay("send", "--config", write_config(tmp_path), "--record", str(history),
                       "--url", "http://127.0.0.1:1/e")  # fmt: skip

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"relay: config error: --record {history}: No such file or directory"
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--count", "0"], "argument --count: 0 only with --catch-up"),
        (["--outage-catch-up"], "argument --outage-catch-up: needs --retry-for"),
        (["--retry-for", "-1"], "argument --retry-for: must not be negative"),
        (["--first-id", "0"], "argument --first-id: must be at least 1"),
    ],
    ids=["count 0", "outage catch-up alone", "negative retry-for", "first-id 0"],
)
def test_options_that_do_not_go_together_are_bad_usage(args: list[str], error: str) -> None:
    result = run_relay("send", "--url", "http://127.0.0.1:1/e", *args)

    assert result.returncode == 2
    assert "usage: relay send" in result.stderr
    assert result.stderr.splitlines()[-1] == f"relay send: error: {error}"
