"""Hostile input and hostile endpoints (docs/OPERATIONS.md, "Running it on the internet").

What anyone on the internet can send the ingress, what a downstream can answer the worker, and
the defaults that keep a careless deployment safe. Behaviour of the HTTP app runs in-process
against a fake publisher; behaviour of a process (timeouts, connections, memory, crash loops,
start-up checks) runs against real `relay ingress` and `relay worker` processes.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import subprocess
import sys
import textwrap
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiohttp import web

from relay.config import from_dict as config_from_dict
from relay.ingress import PUBLISHER
from relay.settings import Settings
from tests.conftest import AMQP_URL, SECRET, MakeSettings, StartWorker, settings_dict
from tests.handlers_for_tests import HttpHandler
from tests.processes import Config, Relay, free_port, ingress_ready
from tests.support import (
    ROOT,
    FakePublisher,
    Ingress,
    activity,
    eventually,
    run_relay,
    running_ingress,
    signed_body,
    toml,
)

PATH = "/webhooks/envoice"
READ_SECONDS = 10.0  # how long a raw client waits for an answer before failing the test


@pytest.fixture
def settings() -> Settings:
    return config_from_dict(settings_dict("hostile", ingress={"max_body_bytes": 4096}))


@pytest.fixture
async def ingress(settings: Settings) -> AsyncIterator[Ingress]:
    async with running_ingress(settings, publisher=FakePublisher()) as running:
        yield running


def published(ingress: Ingress) -> list[Any]:
    publisher = ingress.app[PUBLISHER]
    assert isinstance(publisher, FakePublisher)
    return publisher.published


async def exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send `parts` over one raw connection (`pause` seconds apart), then read until the server
    closes it or READ_SECONDS pass; the bytes the server sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(1 << 20), READ_SECONDS)
    finally:
        writer.close()


def port_of(ingress: Ingress) -> int:
    url = ingress.client._base_url
    assert url is not None
    assert url.port is not None
    return url.port


def headers(body_length: int | str, *extra: str) -> bytes:
    lines = [f"POST {PATH} HTTP/1.1", "Host: relay", f"Content-Length: {body_length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- compressed and oversized bodies ------------------------------------------------------------


GZIP_BOMB = gzip.compress(b"{" + b" " * 8_000_000 + b"}")  # about 8 KB that inflate to 8 MB


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", GZIP_BOMB),
        ("deflate", zlib.compress(b'{"Activity": {}}')),
        ("br", b"\x1b\x00"),
        ("gzip", b'{"not": "gzip at all"}'),  # was a 500
        ("x-unheard-of", b"{}"),
    ],
)
async def test_a_compressed_body_is_415_and_never_inflated(
    ingress: Ingress, encoding: str, body: bytes, logs: list[dict[str, Any]]
) -> None:
    async with ingress.client.post(
        PATH, data=body, headers={"Content-Encoding": encoding}
    ) as response:
        assert response.status == 415
        assert "Content-Encoding" in (await response.json())["error"]
    assert not published(ingress)
    assert not [line for line in logs if line["log_level"] in ("error", "critical")]


async def test_a_declared_length_over_the_limit_is_413_before_the_body_arrives(
    ingress: Ingress,
) -> None:
    answer = await exchange(port_of(ingress), headers(10 * 2**30))  # no body is ever sent

    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"body larger than 4096 bytes" in answer


async def test_expect_100_continue_gets_413_for_a_body_too_large_and_100_otherwise(
    ingress: Ingress, settings: Settings
) -> None:
    too_large = await exchange(port_of(ingress), headers(10 * 2**30, "Expect: 100-continue"))
    assert too_large.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in too_large

    body = signed_body(settings.sources[0], activity())
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(ingress))
    try:
        writer.write(headers(len(body), "Expect: 100-continue"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_SECONDS)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_SECONDS)
        assert final.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert len(published(ingress)) == 1


async def test_a_chunked_body_over_the_limit_is_413(ingress: Ingress) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    async with ingress.client.post(PATH, data=chunks()) as response:
        assert response.status == 413


# --- only 4xx for bad input ---------------------------------------------------------------------


async def test_a_lone_surrogate_in_an_unsigned_body_is_400(ingress: Ingress) -> None:
    body = b'{"Signature": "00", "Timestamp": "\\ud800", "Activity": {}}'  # was a 500

    status, answer, _ = await ingress.post(PATH, body)

    assert status == 400
    assert "surrogate" in answer["error"]


def signed_raw(settings: Settings, raw_activity: bytes) -> bytes:
    return signed_body(settings.sources[0], raw_activity)


@pytest.mark.parametrize(
    ("fragment", "error"),
    [
        (b'"Type": 1000000000000000000000000000000', "Activity.Type: must be int or str"),
        (b'"Type": 11, "Note": "\\udc00"', "surrogate"),
        (b'"Type": 11, "Deep": ' + b"[" * 300 + b"]" * 300, "nested deeper than 64 levels"),
        (b'"Type": 11, "Huge": 1e999', "infinity"),
        (b'"Type": 11, "Nan": NaN', "body is not valid JSON"),
    ],
    ids=["integer beyond 64 bits", "lone surrogate", "300 levels", "1e999", "NaN"],
)
async def test_signed_values_that_cannot_be_forwarded_are_400(
    ingress: Ingress, settings: Settings, fragment: bytes, error: str
) -> None:
    raw = orjson.dumps(activity()).replace(b'"Type":11', fragment)
    assert raw != orjson.dumps(activity())

    status, answer, _ = await ingress.post(PATH, signed_raw(settings, raw))

    assert status == 400, answer
    assert error in answer["error"]
    assert not published(ingress)


async def test_accepted_data_is_forwarded_byte_for_byte(
    ingress: Ingress, settings: Settings
) -> None:
    # Given values a re-encoder would change: a u64 integer, escapes, spacing, a float's form
    raw = orjson.dumps(activity()).replace(
        b'"Type":11', b'"Type": 11, "Big": 18446744073709551615, "Esc": "\\u00e9\\n", "F": 1.50'
    )

    status, _, _ = await ingress.post(PATH, signed_raw(settings, raw))

    assert status == 200
    [event] = published(ingress)
    assert event.data_json == raw


async def test_an_echoed_key_is_clipped(logs: list[dict[str, Any]]) -> None:
    settings = config_from_dict(settings_dict("echo", ingress={"max_body_bytes": 1_000_000}))
    key = "k" * 400_000
    body = orjson.dumps({key: 1})[:-1] + b"," + orjson.dumps({key: 2})[1:]

    async with running_ingress(settings, publisher=FakePublisher()) as ingress:
        status, answer, _ = await ingress.post(PATH, body)

    assert status == 400
    assert answer["error"].endswith("...: duplicate key")
    assert len(answer["error"]) < 100
    [line] = [line for line in logs if line["event"] == "request rejected"]
    assert len(line["error"]) < 100


async def test_no_answer_names_the_server_software(ingress: Ingress) -> None:
    async with ingress.client.get("/healthz") as response:
        assert response.headers["Server"] == "relay"
    async with ingress.client.get("/nowhere") as response:
        assert response.headers["Server"] == "relay"
    garbled = await exchange(port_of(ingress), b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert garbled.startswith(b"HTTP/1.0 400 ")
    assert b"\r\nServer: relay\r\n" in garbled
    assert b"aiohttp" not in garbled
    assert b"Python" not in garbled


# --- a real `relay ingress`: slow clients, connections, start-up checks ---------------------------


async def started_ingress(relay: Relay, config: Config) -> None:
    ingress = await relay.run("ingress", config=config)
    await eventually(lambda: ingress_ready(ingress, config), timeout=20, what="ingress ready")


async def trickle(port: int, head: bytes, *, every: float, count: int) -> tuple[bytes, float]:
    """Send `head`, then one body byte every `every` seconds (`count` at most) while reading;
    what the server answered, and how many seconds after the head the connection closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    started = asyncio.get_running_loop().time()

    async def drip() -> None:
        for _ in range(count):
            await asyncio.sleep(every)
            writer.write(b" ")

    dripping = asyncio.create_task(drip())
    try:
        answer = await asyncio.wait_for(reader.read(1 << 16), READ_SECONDS)
        while await asyncio.wait_for(reader.read(1 << 16), READ_SECONDS):
            pass  # until the server closes
        return answer, asyncio.get_running_loop().time() - started
    finally:
        dripping.cancel()
        writer.close()


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_trickled_body_is_cut_off_with_408(tmp_path: Path) -> None:
    async with Relay(tmp_path) as relay:
        config = relay.config(ingress={"body_timeout_seconds": 1.0})
        await started_ingress(relay, config)

        # 1 byte every 0.25 s of a 100-byte body: 25 s if the server waited for all of it
        answer, seconds = await trickle(
            config.settings.ingress.port, headers(100), every=0.25, count=100
        )

    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in answer
    assert seconds < 5


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_idle_and_half_open_connections_are_closed(tmp_path: Path) -> None:
    async with Relay(tmp_path) as relay:
        config = relay.config(ingress={"keepalive_seconds": 1.0})
        await started_ingress(relay, config)
        port = config.settings.ingress.port

        silent = await trickle(port, b"", every=1, count=0)
        half_headers = await trickle(
            port, b"POST /webhooks/envoice HTTP/1.1\r\nHo", every=1, count=0
        )

    for answer, seconds in (silent, half_headers):
        assert answer == b""  # closed without an answer
        assert seconds < 5


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_connections_over_the_limit_are_refused(tmp_path: Path) -> None:
    async with Relay(tmp_path) as relay:
        config = relay.config(ingress={"max_connections": 3})
        await started_ingress(relay, config)
        port = config.settings.ingress.port

        async def hold_three() -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
            """Three connections, each answered once: the server surely holds all three. None
            while the readiness probe's connection is still counted (its close not yet seen)."""
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            heads = []
            for reader, writer in held:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
                heads.append(await reader.readuntil(b"\r\n\r\n"))
            if all(head.startswith(b"HTTP/1.1 200 ") for head in heads):
                return held
            for _, writer in held:
                writer.close()
            return []

        held = await eventually(hold_three, what="three connections held")

        refused = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")

        for _, writer in held:
            writer.close()

        async def served() -> bool:
            request = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
            answer = await exchange(port, request)
            return answer.startswith(b"HTTP/1.1 200 ")

        await eventually(served, what="a connection served once the others closed")

    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"too many connections" in refused


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_client_leaving_mid_body_is_not_an_error(tmp_path: Path) -> None:
    async with Relay(tmp_path) as relay:
        config = relay.config()
        await started_ingress(relay, config)
        [ingress] = relay.processes
        port = config.settings.ingress.port

        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(headers(100) + b'{"Signature"')
        await writer.drain()
        writer.close()
        await eventually(lambda: ingress.logged("client went away"), what="the disconnect seen")
        async with (
            aiohttp.ClientSession() as client,
            client.get(config.base_url + "/metrics") as response,
        ):
            exported = await response.text()

    lines = [orjson.loads(line) for line in ingress.output().splitlines() if line.startswith("{")]
    assert lines, ingress.output()  # JSON log lines were read: else the check below holds for none
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    assert 'status="client_closed"} 1.0' in exported
    assert 'status="500"' not in exported


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_operational_endpoints_can_move_to_an_admin_port(tmp_path: Path) -> None:
    admin_port = free_port()
    async with Relay(tmp_path) as relay:
        config = relay.config(ingress={"admin_port": admin_port})
        ingress = await relay.run("ingress", config=config)
        admin = f"http://127.0.0.1:{admin_port}"
        async with aiohttp.ClientSession() as client:

            async def ready() -> bool:
                ingress.check_running()
                try:
                    async with client.get(admin + "/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(ready, timeout=20, what="admin /readyz")
            statuses = {}
            for base, path in [(admin, "/healthz"), (admin, "/metrics")] + [
                (config.base_url, p) for p in ("/healthz", "/readyz", "/metrics")
            ]:
                async with client.get(base + path) as response:
                    statuses[(base == admin, path)] = response.status

    assert statuses == {
        (True, "/healthz"): 200,
        (True, "/metrics"): 200,
        (False, "/healthz"): 404,
        (False, "/readyz"): 404,
        (False, "/metrics"): 404,
    }


def config_file(
    tmp_path: Path, handlers: list[dict[str, Any]] | None = None, **sections: dict[str, Any]
) -> str:
    raw = settings_dict("start", handlers=handlers or [], url=AMQP_URL, **sections)
    path = tmp_path / "relay.toml"
    path.write_text(toml(raw), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("command", "sections", "env", "expected"),
    [
        (
            "ingress",
            {"source": {"secrets": ["env:RELAY_TEST_EMPTY"]}},
            {"RELAY_TEST_EMPTY": "  "},
            "sources[0].secrets[0]: environment variable RELAY_TEST_EMPTY is empty",
        ),
        (
            "ingress",  # set but empty: no fallback to the development default
            {"source": {"secrets": ["env:RELAY_TEST_EMPTY:-dev-secret"]}},
            {"RELAY_TEST_EMPTY": ""},
            "sources[0].secrets[0]: environment variable RELAY_TEST_EMPTY is empty",
        ),
        (
            "ingress",
            {"source": {"secrets": ["env:RELAY_TEST_UNSET:-dev-secret"]},
             "ingress": {"host": "0.0.0.0"}},  # noqa: S104
            {},
            "sources[0].secrets[0]: env:RELAY_TEST_UNSET is not set, and its development default "
            "is refused while ingress.host is '0.0.0.0' (not loopback)",
        ),
        (
            "worker",
            {"handlers": [{"name": "h", "events": ["envoice.#"], "url": "http://127.0.0.1:9/",
                           "signing_secret": "whsec_abcde"}]},
            {},
            "handlers[0].signing_secret: expected whsec_<base64> or base64",
        ),
    ],
    ids=["blank secret", "empty variable", "development secret off loopback", "bad whsec"],
)  # fmt: skip
def test_unsafe_secrets_stop_relay_at_start(
    tmp_path: Path, command: str, sections: dict[str, Any], env: dict[str, str], expected: str
) -> None:
    done = run_relay(
        command, "--config", config_file(tmp_path, **sections), env=env, unset=("RELAY_TEST_UNSET",)
    )

    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert expected in line
    assert "dev-secret" not in line


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_development_secret_on_loopback_is_logged_loudly(tmp_path: Path) -> None:
    assert "RELAY_TEST_UNSET" not in os.environ
    async with Relay(tmp_path) as relay:
        config = relay.config(source={"secrets": ["env:RELAY_TEST_UNSET:-dev-secret"]})
        await started_ingress(relay, config)
        [ingress] = relay.processes

    warning = "DEVELOPMENT SECRET IN USE: anyone who read the config can sign webhooks"
    [line] = ingress.events(warning)
    assert line["level"] == "warning"
    assert line["secret"] == "Secret(<env:RELAY_TEST_UNSET default>)"
    assert "dev-secret" not in ingress.output()


@pytest.mark.timeout(60)
async def test_a_development_console_token_on_loopback_is_logged_loudly(tmp_path: Path) -> None:
    assert "RELAY_TEST_UNSET" not in os.environ
    port = free_port()
    async with Relay(tmp_path) as relay:
        config = relay.config(console={"token": "env:RELAY_TEST_UNSET:-dev-token", "port": port})
        console = await relay.run("console", config=config)
        warning = "DEVELOPMENT TOKEN IN USE: anyone who read the config can log in"
        await eventually(lambda: console.logged(warning), timeout=30, what="the warning")

    [line] = console.events(warning)
    assert (line["level"], line["token"]) == ("warning", "token")
    assert line["secret"] == "Secret(<env:RELAY_TEST_UNSET default>)"
    assert "dev-token" not in console.output()


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_worker_metrics_listen_on_loopback_by_default(tmp_path: Path) -> None:
    port = free_port()
    async with Relay(tmp_path) as relay:
        config = relay.config(worker={"metrics_port": port})
        await relay.worker(config)

        async def served() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as client,
                    client.get(f"http://127.0.0.1:{port}/metrics") as response,
                ):
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(served, what="worker /metrics")
        listening = listeners(port)

    assert listening == {"127.0.0.1"}


def listeners(port: int) -> set[str]:
    """The local addresses listening on TCP `port` (IPv4), from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_relay_send_takes_its_secret_from_the_environment_not_argv(tmp_path: Path) -> None:
    refused = run_relay("send", "--secret", SECRET)
    assert refused.returncode == 2
    assert "unrecognized arguments: --secret" in refused.stderr

    async with Relay(tmp_path) as relay:
        config = relay.config()
        await started_ingress(relay, config)
        args = ("send", "--config", str(config.path), "--count", "2", "--secret-env", "RELAY_KEY")
        right = run_relay(*args, env={"RELAY_KEY": SECRET})
        wrong = run_relay(*args, env={"RELAY_KEY": "not-the-secret"})

    assert (right.returncode, right.stdout.strip()) == (0, "sent 2: 2 accepted")
    assert (wrong.returncode, wrong.stdout.strip()) == (1, "sent 2: 2 HTTP 401")


# --- logs ---------------------------------------------------------------------------------------


def test_logged_tracebacks_carry_no_frame_locals() -> None:
    program = textwrap.dedent(
        """
        import logging, structlog
        from relay.logging import configure
        configure()

        def fail(api_secret: str) -> None:
            payload = {"card": "4111-1111-1111-1111"}
            raise ValueError("boom")

        try:
            fail("s3cr3t-value")
        except ValueError:
            structlog.get_logger().exception("failed")
            logging.getLogger("library").exception("failed too")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT,
        check=False,
    )  # fmt: skip

    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    for line in lines:
        assert '"exc_type":"ValueError"' in line.replace(" ", "")
        assert "s3cr3t-value" not in line
        assert "4111" not in line


# --- a real `relay worker` against hostile endpoints ----------------------------------------------


BIG = 64 * 2**20


class HostileEndpoint:
    """A downstream that answers every delivery with 2xx and a 64 MB body, plain or as a gzip
    bomb (64 KB on the wire), and counts the deliveries."""

    def __init__(self) -> None:
        self.deliveries = 0
        self._bomb = gzip.compress(b"\0" * BIG)
        app = web.Application()
        app.router.add_post("/hook", self._answer)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.url = ""

    async def __aenter__(self) -> HostileEndpoint:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.deliveries += 1
        bomb = self.deliveries % 2 == 0
        response = web.StreamResponse(
            status=200, headers={"Content-Encoding": "gzip"} if bomb else {}
        )
        response.content_length = len(self._bomb) if bomb else BIG
        await response.prepare(request)
        body = self._bomb if bomb else b"x" * BIG
        try:
            for start in range(0, len(body), 2**20):
                await response.write(body[start : start + 2**20])
        except (ConnectionError, RuntimeError):
            pass  # relay stopped reading: as it should
        return response


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) / 1024


@pytest.mark.rabbit
@pytest.mark.timeout(90)
async def test_huge_and_compressed_answers_are_not_read(tmp_path: Path) -> None:
    async with HostileEndpoint() as endpoint, Relay(tmp_path) as relay:
        config = relay.config({"name": "h", "events": ["envoice.#"], "url": endpoint.url,
                               "partitions": 1})  # fmt: skip
        _, worker = await relay.start(config)
        for invoice in range(6):
            answer = await post_webhook(config, invoice)
            assert answer == 200

        await eventually(lambda: worker.logged("delivered") == 6, timeout=30, what="6 delivered")
        peak = peak_rss_mb(worker.process.pid)

    assert endpoint.deliveries == 6
    assert peak < 100, f"worker peak RSS {peak:.0f} MB"


async def post_webhook(config: Config, invoice: int) -> int:
    body = signed_body(config.settings.sources[0], activity(InvoiceId=invoice))
    async with (
        aiohttp.ClientSession() as client,
        client.post(config.webhook_url, data=body) as response,
    ):
        return response.status


@pytest.mark.rabbit
@pytest.mark.timeout(90)
async def test_a_delivery_that_cannot_be_made_is_dead_lettered_and_the_worker_goes_on(
    tmp_path: Path, http_handler: HttpHandler, channel: AbstractChannel
) -> None:
    async with Relay(tmp_path) as relay:
        config = relay.config({"name": "h", "events": ["envoice.#"], "url": http_handler.url,
                               "partitions": 1})  # fmt: skip
        handler = config.settings.handlers[0]
        # Given a message whose id the HTTP client refuses as a header value (a newline), put
        # straight into the partition queue, as anyone with access to the broker could
        await channel.declare_queue(handler.queue(0), durable=True, arguments=QUORUM_SAC)
        body = orjson.dumps({"id": "bad\nid", "key": "invoice:1"})
        poison = aio_pika.Message(body, message_id="bad\nid", headers={"x-relay-key": "invoice:1"})
        await channel.default_exchange.publish(poison, routing_key=handler.queue(0))

        _, worker = await relay.start(config)
        assert await post_webhook(config, 2) == 200

        await eventually(lambda: len(http_handler.requests) == 1, what="the next one delivered")

        async def dead_lettered() -> int:
            dlq = await channel.declare_queue(handler.dead_letter_queue, passive=True)
            return dlq.declaration_result.message_count or 0

        # (the other key does not wait for the dead letter's confirm)
        dead_letters = await eventually(dead_lettered, what="the dead letter in its queue")
        [dead] = worker.events("dead-lettered")
        assert worker.running

    assert dead["message_id"] == "bad\nid"
    assert dead["detail"].startswith("cannot deliver: ValueError")
    assert dead_letters == 1


QUORUM_SAC: dict[str, Any] = {"x-queue-type": "quorum", "x-single-active-consumer": True}


@pytest.mark.rabbit
async def test_redirects_and_undecodable_bodies_are_dead_lettered_at_once(
    make_settings: MakeSettings,
    http_handler: HttpHandler,
    start_worker: StartWorker,
    channel: AbstractChannel,
) -> None:
    http_handler.default = (302, {"Location": "http://elsewhere.example/"})
    settings = make_settings(
        handlers=[
            {"name": "web", "events": ["envoice.#"], "url": http_handler.url, "partitions": 1},
            {"name": "py", "events": ["envoice.#"], "call": "tests.handlers_for_tests:record",
             "partitions": 1},
        ]
    )  # fmt: skip
    web_handler, py_handler = settings.handlers
    await start_worker(settings)
    not_json = aio_pika.Message(b"\xff not json", message_id="envoice:1")
    await channel.default_exchange.publish(not_json, routing_key=py_handler.queue(0))
    redirected = aio_pika.Message(b'{"id": "envoice:2", "key": "k"}', message_id="envoice:2")
    await channel.default_exchange.publish(redirected, routing_key=web_handler.queue(0))

    reasons = {}
    for handler in (web_handler, py_handler):
        queue = await channel.get_queue(handler.dead_letter_queue)

        async def dead(queue: AbstractQueue = queue) -> AbstractIncomingMessage | None:
            return await queue.get(no_ack=True, fail=False)

        letter = await eventually(dead, what="a dead letter")
        reasons[handler.name] = (
            letter.headers["x-relay-reason"],
            letter.headers["x-relay-attempts"],
        )

    assert reasons[web_handler.name] == ("HTTP 302 (redirects are not followed)", 1)
    assert reasons[py_handler.name][0].startswith("body is not JSON")
    assert reasons[py_handler.name][1] == 1
    assert len(http_handler.requests) == 1
