"""End to end: `relay ingress` and `relay worker` as separate processes, real broker and handler."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import os
import signal
import socket
import sys
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest

from relay import topology
from relay.settings import Settings
from tests.conftest import AMQP_URL, settings_dict
from tests.handlers_for_tests import HttpHandler, Request
from tests.support import activity, eventually, signed_body

pytestmark = pytest.mark.rabbit

STARTUP_SECONDS = 20.0
EXIT_SECONDS = 20.0


# --- config files -----------------------------------------------------------------------------


def toml(raw: dict[str, Any]) -> str:
    """A config dict as TOML: top-level tables and arrays of tables of plain values."""
    lines: list[str] = []
    for name, value in raw.items():
        tables = value if isinstance(value, list) else [value]
        header = f"[[{name}]]" if isinstance(value, list) else f"[{name}]"
        for table in tables:
            lines += [header, *(f"{k} = {_toml_value(v)}" for k, v in table.items()), ""]
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def delete_topology(settings: Settings) -> None:
    """Delete the queues and exchanges relay declares for `settings`, except the shared ones."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        described = topology.describe(settings)
        for queue in described.queues:
            if queue.name != topology.UNROUTED:
                await (await connection.channel()).queue_delete(queue.name)
        for exchange in described.exchanges:
            if exchange.name != topology.UNROUTED:
                await (await connection.channel()).exchange_delete(exchange.name)


@dataclass(frozen=True)
class Config:
    """A config file for the relay processes, and what it says."""

    path: Path
    settings: Settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.ingress.port}"

    @property
    def webhook_url(self) -> str:
        return self.base_url + self.settings.sources[0].path


@pytest.fixture
async def relay_config(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Config]]:
    """Writes a config with one handler, unique broker names and a free ingress port.

    Everything it names on the broker is deleted after the test.
    """
    made: list[Config] = []

    def make(handler: dict[str, Any]) -> Config:
        raw = settings_dict(uuid.uuid4().hex[:8], handlers=[handler], ingress={"port": free_port()})
        path = tmp_path / f"relay-{len(made)}.toml"
        path.write_text(toml(raw), encoding="utf-8")
        assert tomllib.loads(path.read_text(encoding="utf-8")) == raw
        config = Config(path, Settings.from_file(path))
        made.append(config)
        return config

    yield make
    for config in made:
        await delete_topology(config.settings)


# --- processes --------------------------------------------------------------------------------


class RelayProcess:
    """A `relay` command running as a subprocess, its output going to a file."""

    def __init__(self, args: tuple[str, ...], process: asyncio.subprocess.Process, log: Path):
        self.args, self.process, self.log = args, process, log

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def logged(self, event: str) -> int:
        """How many JSON log lines with this `event` the process wrote so far."""
        lines = (line for line in self.output().splitlines() if line.startswith("{"))
        return sum(1 for line in lines if orjson.loads(line).get("event") == event)

    def check_running(self) -> None:
        if self.process.returncode is not None:
            raise AssertionError(
                f"relay {self.args[0]} exited {self.process.returncode}:\n{self.output()}"
            )

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.process.wait(), EXIT_SECONDS)

    async def terminate(self) -> int:
        """SIGTERM, then the exit code: the process drains and exits by itself."""
        self.process.send_signal(signal.SIGTERM)
        return await self.exit_code()


RunRelay = Callable[..., Awaitable[RelayProcess]]


@pytest.fixture
async def run_relay(
    tmp_path: Path, relay_config: Callable[[dict[str, Any]], Config]
) -> AsyncIterator[RunRelay]:
    """`await run_relay("worker", config=config)`: `python -m relay worker --config ...`.

    Processes still running after the test are killed (before `relay_config` deletes their
    queues); every output is printed (pytest shows it when the test fails).
    """
    started: list[RelayProcess] = []

    async def run(*args: str, config: Config) -> RelayProcess:
        log = tmp_path / f"{len(started)}-{args[0]}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", *args, "--config", str(config.path),
                stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        started.append(RelayProcess(args, process, log))
        return started[-1]

    yield run
    for relay in started:
        if relay.process.returncode is None:
            relay.process.kill()
            await relay.process.wait()
        print(f"--- relay {' '.join(relay.args)} (exit {relay.process.returncode}):")
        print(relay.output())


async def ingress_ready(ingress: RelayProcess, config: Config) -> bool:
    ingress.check_running()
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.get(config.base_url + "/readyz") as response,
        ):
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


def worker_consuming(worker: RelayProcess) -> bool:
    worker.check_running()
    return worker.logged("worker consuming") > 0


async def start_relay(run_relay: RunRelay, config: Config) -> tuple[RelayProcess, RelayProcess]:
    """`relay ingress` and `relay worker`, each in its own process, ready to work."""
    ingress = await run_relay("ingress", config=config)
    worker = await run_relay("worker", config=config)
    await eventually(
        lambda: ingress_ready(ingress, config), timeout=STARTUP_SECONDS, what="ingress ready"
    )
    await eventually(
        lambda: worker_consuming(worker), timeout=STARTUP_SECONDS, what="worker consuming"
    )
    return ingress, worker


@pytest.fixture
async def http_handler() -> AsyncIterator[HttpHandler]:
    async with HttpHandler() as server:
        yield server


# --- helpers ----------------------------------------------------------------------------------


_activity_ids = itertools.count(time.time_ns() // 1000)


def activities(invoices: int, each: int) -> dict[int, list[dict[str, Any]]]:
    """`each` Envoice activities for each of invoices 1..`invoices`, in sending order."""
    return {
        invoice: [
            activity(Id=next(_activity_ids), InvoiceId=invoice, InvoiceNumber=f"INV-{invoice}")
            for _ in range(each)
        ]
        for invoice in range(1, invoices + 1)
    }


async def post_webhooks(config: Config, sent: dict[int, list[dict[str, Any]]]) -> list[str]:
    """POST each invoice's activities one after the other, invoices concurrently; the answers."""
    source = config.settings.sources[0]
    answers: list[str] = []

    async def post_invoice(client: aiohttp.ClientSession, acts: list[dict[str, Any]]) -> None:
        for act in acts:
            async with client.post(config.webhook_url, data=signed_body(source, act)) as response:
                answer = await response.json()
                answers.append(f"{response.status} {answer.get('status')} {answer.get('id')}")

    async with aiohttp.ClientSession() as client:
        await asyncio.gather(*(post_invoice(client, acts) for acts in sent.values()))
    return answers


def standard_webhooks_signature(secret: str, request: Request) -> str:
    """`v1,<base64 HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>">`, computed here
    from the Standard Webhooks spec rather than with relay's own code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    headers = request.headers
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request.body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# --- tests ------------------------------------------------------------------------------------


async def test_webhooks_reach_an_http_handler_signed_and_in_order_per_invoice(
    relay_config: Callable[[dict[str, Any]], Config],
    run_relay: RunRelay,
    http_handler: HttpHandler,
) -> None:
    # Given relay's ingress and worker processes, and an HTTP handler with 4 partitions
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    config = relay_config(
        {"name": "billing", "events": ["envoice.#"], "url": http_handler.url,
         "signing_secret": secret, "partitions": 4}
    )  # fmt: skip
    ingress, worker = await start_relay(run_relay, config)

    # When 200 signed webhooks over 10 invoices are POSTed, in order per invoice
    sent = activities(invoices=10, each=20)
    answers = await post_webhooks(config, sent)

    # Then the ingress accepts every one
    expected_ids = [f"envoice:{act['Id']}" for acts in sent.values() for act in acts]
    assert sorted(answers) == sorted(f"200 accepted {i}" for i in expected_ids)
    # and the handler gets every one, once, each invoice in the order sent
    await eventually(
        lambda: len(http_handler.requests) >= len(expected_ids), timeout=30, what="deliveries"
    )
    requests = list(http_handler.requests)
    assert sorted(r.id for r in requests) == sorted(expected_ids)
    for invoice, acts in sent.items():
        got = [r.id for r in requests if r.json["key"] == f"invoice:{invoice}"]
        assert got == [f"envoice:{act['Id']}" for act in acts], f"invoice {invoice}"
    # each a Standard Webhooks request with a valid signature, on its first attempt
    for request in requests:
        headers = request.headers
        assert headers["webhook-id"] == request.id
        assert headers["content-type"] == "application/json"
        assert headers["x-relay-attempt"] == "1"
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        signatures = headers["webhook-signature"].split()
        assert standard_webhooks_signature(secret, request) in signatures, request.id

    # When both processes get SIGTERM, Then they drain and exit 0
    assert await ingress.terminate() == 0
    assert await worker.terminate() == 0


async def test_relay_send_reaches_the_built_in_log_handler(
    relay_config: Callable[[dict[str, Any]], Config], run_relay: RunRelay
) -> None:
    # Given relay's ingress and worker processes, with the built-in logging handler
    config = relay_config(
        {"name": "log", "events": ["envoice.#"], "call": "relay.handlers:log", "partitions": 4}
    )
    ingress, worker = await start_relay(run_relay, config)

    # When `relay send` POSTs 20 sample webhooks over 4 invoices
    sender = await run_relay(
        "send", "--count", "20", "--invoices", "4", "--url", config.webhook_url, config=config
    )

    # Then it reports all accepted
    assert await sender.exit_code() == 0
    assert "sent 20: 20 accepted" in sender.output().splitlines()
    # and the worker delivers each to the log handler, which logs it
    await eventually(lambda: worker.logged("delivered") >= 20, timeout=20, what="20 delivered")
    assert await ingress.terminate() == 0
    assert await worker.terminate() == 0
    assert worker.logged("delivered") == 20
    assert worker.logged("activity") == 20
