"""`relay bench`: its HTTP reader and report as pure logic; the command against a real ingress."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.ops.bench import BadReply, Load, check_delivery, parse_response, percentile
from tests.processes import STARTUP_SECONDS, Config, Relay, free_port, ingress_ready
from tests.support import Completed, declare_topology, eventually, relay_command

SINK = {"name": "sink", "events": ["envoice.#"], "call": "relay.handlers:log", "partitions": 2}
MANAGEMENT = "http://127.0.0.1:15672/api"
BENCH_SECONDS = 90.0  # the longest `relay bench` below, --e2e included


# --- the HTTP reader --------------------------------------------------------------------------


def test_an_answer_is_read_once_its_body_is_complete() -> None:
    answer = b'HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\n{"status":"accepted","x":1}'

    for cut in (5, 20, len(answer) - 3):
        assert parse_response(answer[:cut]) is None
    full = parse_response(answer[:-2])
    assert full is not None
    assert (full.status, full.body, full.close) == (200, b'{"status":"accepted","x":', False)
    assert full.size == len(answer) - 2  # the next answer starts there


def test_connection_close_http_1_0_and_empty_statuses() -> None:
    closing = parse_response(b"HTTP/1.1 503 X\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    old = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    empty = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")

    assert closing is not None
    assert (closing.status, closing.close) == (503, True)
    assert old is not None
    assert old.close
    assert empty is not None
    assert (empty.status, empty.body) == (204, b"")


def test_an_answer_without_length_ends_at_eof() -> None:
    data = b"HTTP/1.1 200 OK\r\n\r\nbody"

    assert parse_response(data) is None
    answer = parse_response(data, eof=True)
    assert answer is not None
    assert (answer.body, answer.close) == (b"body", True)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    ],
)
def test_answers_relay_bench_cannot_read_are_errors(data: bytes, error: str) -> None:
    with pytest.raises(BadReply, match=error):
        parse_response(data)


def test_a_connection_closed_mid_answer_is_an_error() -> None:
    with pytest.raises(BadReply, match="closed in the middle"):
        parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=True)


# --- the report -------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]

    assert [percentile(values, q) for q in (50, 95, 99, 100)] == [50.0, 95.0, 99.0, 100.0]
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_what_is_signed_ahead() -> None:
    assert Load(concurrency=50, keys=100, count=500).to_sign == 500
    assert Load(concurrency=50, keys=100, seconds=2, rate=300).to_sign == 600
    assert Load(concurrency=50, keys=100, seconds=1e6, rate=1e6).to_sign == 200_000  # capped
    assert Load(concurrency=50, keys=10, ordered=True).connections == 10  # a key per connection


def test_delivery_counts_losses_repeats_and_order_per_key() -> None:
    accepted = {1: ["a1", "a2", "a3"], 2: ["b1", "b2"]}
    sent_at = {i: 0.0 for ids in accepted.values() for i in ids}
    arrivals = [("a1", 1.0), ("b2", 1.5), ("a2", 2.0), ("b1", 2.5), ("a1", 3.0), ("zz", 3.0)]

    delivery = check_delivery(accepted, sent_at, arrivals, start=0.0)

    assert delivery.delivered == 4  # a3 never came; zz was never accepted
    assert delivery.lost == 1
    assert delivery.duplicates == 1  # a1 twice
    assert delivery.order_violations == 1  # key 2: b2 before b1
    assert delivery.seconds == 2.5
    assert sorted(delivery.latencies) == [1.0, 1.5, 2.0, 2.5]


# --- against a real ingress -------------------------------------------------------------------


async def bench(config: Config, *args: str) -> tuple[Completed, dict[str, Any]]:
    done = await relay_command(
        "bench", "--config", str(config.path), "--json", "--quiet", *args, timeout=BENCH_SECONDS
    )
    lines = done.stdout.splitlines()
    return done, json.loads(lines[-1]) if lines else {}


@pytest.fixture
async def ingress(tmp_path: Path) -> AsyncIterator[Config]:
    """A `relay ingress` with one handler's queues declared (no worker: they only fill)."""
    async with Relay(tmp_path) as relay:
        config = relay.config(SINK)
        await declare_topology(config.settings)
        running = await relay.run("ingress", config=config)
        await eventually(
            lambda: ingress_ready(running, config), timeout=STARTUP_SECONDS, what="ingress ready"
        )
        yield config


@pytest.mark.rabbit
@pytest.mark.timeout(BENCH_SECONDS + 30)
async def test_bench_count_sends_exactly_that_many(ingress: Config) -> None:
    done, report = await bench(ingress, "--count", "50", "--concurrency", "5")

    assert done.returncode == 0, done.stderr
    assert (report["requests"], report["accepted"]) == (50, 50)
    assert report["answers"] == {"accepted": 50}
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["accepted_per_second"] > 0


@pytest.mark.rabbit
@pytest.mark.timeout(BENCH_SECONDS + 30)
async def test_bench_rate_holds_an_open_loop(ingress: Config) -> None:
    done, report = await bench(ingress, "--rate", "100", "--duration", "2")

    assert done.returncode == 0, done.stderr
    assert report["requests"] == report["accepted"] == 200  # due at 0, 1/100 s, ... < 2 s
    assert report["signed_during_run"] == 0  # all signed before the clock started


@pytest.mark.rabbit
@pytest.mark.timeout(BENCH_SECONDS + 30)
async def test_bench_e2e_delivers_every_webhook_in_order_and_cleans_up(ingress: Config) -> None:
    before = await _bench_queues()
    done, report = await bench(ingress, "--e2e", "--count", "300", "--keys", "20")

    assert done.returncode == 0, done.stderr
    assert report["accepted"] == report["delivered"] == 300
    assert (report["lost"], report["order_violations"], report["duplicates"]) == (0, 0, 0)
    assert report["delivered_per_second"] > 0
    assert report["e2e_p50_ms"] <= report["e2e_max_ms"]
    assert await _bench_queues() == before  # the temporary handler's queues are gone


async def _bench_queues() -> set[str]:
    """The temporary handlers' queues on the broker (`relay.bench-<hex>.*`)."""
    auth = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    async with (
        aiohttp.ClientSession(headers=auth) as client,
        client.get(f"{MANAGEMENT}/queues?columns=name") as response,
    ):
        return {q["name"] for q in await response.json() if q["name"].startswith("relay.bench-")}


@pytest.mark.rabbit
@pytest.mark.timeout(BENCH_SECONDS + 30)
async def test_bench_exits_1_naming_what_it_was_answered(ingress: Config, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-secret.toml"
    wrong.write_text(ingress.path.read_text().replace("test-secret", "not-the-secret"))
    assert wrong.read_text() != ingress.path.read_text()

    done, report = await bench(Config(wrong, ingress.settings), "--count", "5")

    assert done.returncode == 1
    assert report["answers"] == {"HTTP 401": 5}
    assert "HTTP 401: Signature: does not match" in done.stderr


@pytest.mark.rabbit
@pytest.mark.timeout(BENCH_SECONDS + 30)
async def test_bench_against_nothing_listening_exits_1(ingress: Config) -> None:
    url = f"http://127.0.0.1:{free_port()}/webhooks/envoice"
    done, report = await bench(ingress, "--count", "3", "--url", url)

    assert done.returncode == 1
    assert report["answers"] == {"failed": 3}
    assert "Connection refused" in done.stderr
