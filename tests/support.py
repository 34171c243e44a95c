"""Helpers for relay's tests: polling with a deadline, a TCP proxy to cut the broker, samples,
an in-process worker, the `relay` command as a subprocess, config files, missing tools."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractChannel
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from relay import topology
from relay.ingress import EventPublisher, create_app, not_ready, runner_options
from relay.providers import PROVIDERS, Event, Request
from relay.settings import Settings, SourceSettings
from relay.worker import Worker

ROOT = Path(__file__).resolve().parents[1]


def _suite_url() -> str:
    """The suite's broker and vhost: $RELAY_AMQP_URL. Under pytest-xdist (`-n N`), each test
    process takes a vhost of its own, the suite's vhost suffixed with its worker id (`...-gw0`),
    which deploy/test.sh creates and deletes: tests that read a whole vhost (the archive, relay
    status) see only their own process's traffic. Set in the environment too, so that the relay
    processes a test starts use it."""
    url = os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@localhost:5672/")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and "," not in url:
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(path=f"/{parts.path[1:] or 'relay-test'}-{worker}"))
        os.environ["RELAY_AMQP_URL"] = url
    return url


AMQP_URL = _suite_url()


@contextlib.contextmanager
def as_written() -> Iterator[None]:
    """Config loaded as written: without $RELAY_AMQP_URL (the suite's broker), which would
    override a test's own broker.url, a proxy's for instance."""
    saved = os.environ.pop("RELAY_AMQP_URL", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["RELAY_AMQP_URL"] = saved


# Set by deploy/test.sh, which installs every tool the suite uses: then a missing one is a
# failure, not a skip, so that no check is quietly dropped from the test command's run.
STRICT_TOOLS_ENV = "RELAY_TEST_STRICT_TOOLS"


def missing_tool(what: str) -> NoReturn:
    """A tool a test needs is not installed (`what` says which, how to install it, and what is
    left unchecked): under the test command ($RELAY_TEST_STRICT_TOOLS=1) the test fails, else
    it is skipped, saying so (pytest -ra lists the reason)."""
    if os.environ.get(STRICT_TOOLS_ENV) == "1":
        pytest.fail(f"{what} (deploy/test.sh installs it; {STRICT_TOOLS_ENV}=1)")
    pytest.skip(f"MISSING TOOL: {what}")


STOP_WITHIN = 5.0  # seconds a worker may take to stop


async def eventually(
    check: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `check` (sync or async) until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(interval)


# Activity Ids: from the time in microseconds, never the same twice in a process (two activities
# made within one microsecond would be one webhook to relay); every test module takes its Ids here
# (two counters started milliseconds apart would soon give the same Ids)
activity_ids = itertools.count(time.time_ns() // 1000)


def activity(**fields: Any) -> dict[str, Any]:
    """An Envoice Activity with sensible defaults (Paid on invoice 42)."""
    base: dict[str, Any] = {
        "Message": "Invoice paid",
        "Link": "https://app.envoice.example/invoices/42",
        "Type": 11,
        "InvoiceNumber": "INV-42",
        "InvoiceId": 42,
        "OrderNumber": "",
        "OrderId": 0,
        "Id": next(activity_ids),
        "CreatedOn": "2026-11-28T11:59:59.9Z",
    }
    base.update(fields)
    return base


def now_timestamp(offset: float = 0.0) -> str:
    """A .NET-style UTC timestamp with 7 fractional digits."""
    t = time.time() + offset
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e7):07d}Z"


def envoice_signature(
    secret: str,
    timestamp: str,
    raw_activity: bytes,
    *,
    template: str = "{Timestamp}.{Activity}",
    algorithm: str = "hmac-sha256",
) -> str:
    """The Envoice signature recipe (docs/SOURCES.md), written out apart from relay's own code."""
    message = template.encode().replace(b"{Timestamp}", timestamp.encode())
    message = message.replace(b"{Activity}", raw_activity)
    if algorithm == "sha256":
        return hashlib.sha256(secret.encode() + message).hexdigest()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_body(
    source: SourceSettings,
    act: dict[str, Any] | bytes,
    *,
    timestamp: str | None = None,
    secret_index: int = 0,
    signature: str | None = None,
) -> bytes:
    """A webhook body signed with the source's recipe (by `envoice_signature`, not relay's own
    code); `act` may be raw Activity bytes."""
    timestamp = timestamp or now_timestamp()
    raw = act if isinstance(act, bytes) else orjson.dumps(act)
    if signature is None:
        signature = envoice_signature(
            source.secrets[secret_index].value,
            timestamp,
            raw,
            template=source.options.signature_template,
            algorithm=source.options.signature_algorithm,
        )
    head = orjson.dumps({"Signature": signature, "Timestamp": timestamp})
    return head[:-1] + b',"Activity":' + raw + b"}"


class FakePublisher:
    """Stands in for the broker publisher at the ingress's seam: always ready, confirms every
    publish at once (or raises `error`), and keeps what it was given."""

    def __init__(self) -> None:
        self.published: list[Event] = []
        self.error: Exception | None = None

    @property
    def ready(self) -> bool:
        return True

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, event: Event) -> None:
        if self.error is not None:
            raise self.error
        self.published.append(event)


async def declare_topology(settings: Settings) -> None:
    """Declare everything `settings` describe, as `relay topology declare` would (a stream that
    exists is left as it is)."""
    connection = await aio_pika.connect(settings.broker.url)
    async with connection:
        described = await topology.without_existing_streams(connection, topology.describe(settings))
        await topology.declare(await connection.channel(), described)


@contextlib.asynccontextmanager
async def running_ingress(
    settings: Settings, *, ready: bool = True, publisher: EventPublisher | None = None
) -> AsyncIterator[Ingress]:
    """The ingress app on a loopback port, with a client; waits for the broker when `ready`.
    With a `publisher`, no broker is involved; without, the settings' whole topology is declared
    first, as an operator runs `relay topology declare` before traffic arrives."""
    if publisher is None and ready:
        await declare_topology(settings)
    app = create_app(settings, publisher)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(**runner_options(settings.ingress))
    try:
        async with ClientSession(base_url=str(server.make_url(""))) as client:
            ingress = Ingress(app, client)
            if ready:
                await eventually(lambda: not not_ready(app), what="ingress ready")
            yield ingress
    finally:
        await server.close()


class Ingress:
    def __init__(self, app: web.Application, client: ClientSession) -> None:
        self.app, self.client = app, client

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with self.client.post(path, data=body, headers=headers) as response:
            return response.status, await response.json(), dict(response.headers)


class TcpProxy:
    """A loopback TCP proxy to the broker that a test can cut, stall and restore."""

    def __init__(self, target_port: int = 5672) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.stalled = asyncio.Event()

    def url(self) -> str:
        """Through the proxy, to the suite's vhost."""
        return urlsplit(AMQP_URL)._replace(netloc=f"guest:guest@127.0.0.1:{self.port}").geturl()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and drop every connection: the broker looks gone."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for task in (
            asyncio.ensure_future(self._pipe(reader, up_writer, stallable=False)),
            asyncio.ensure_future(self._pipe(up_reader, writer, stallable=True)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, stallable: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if stallable and self.stalled.is_set():
                    continue  # swallow the broker's answers: confirms never arrive
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


# --- events -----------------------------------------------------------------------------------


def handler(target: dict[str, Any], **options: Any) -> dict[str, Any]:
    """A handler of every Envoice event: one partition and quick retries unless told otherwise."""
    return {
        "name": "h",
        "events": ["envoice.#"],
        "partitions": 1,
        "backoff_initial_ms": 20,
        "backoff_max_ms": 100,
        "timeout_seconds": 2.0,
        **target,
        **options,
    }


def new_event(settings: Settings, invoice: int = 42) -> Event:
    """A verified Envoice `paid` event on `invoice`, as the ingress would publish it."""
    source = settings.sources[0]
    act = activity(InvoiceId=invoice, InvoiceNumber=f"INV-{invoice}")
    request = Request(signed_body(source, act), {})
    return PROVIDERS[source.scheme].parse(request, source, time.time())


def events_per_invoice(settings: Settings, invoices: int, each: int) -> dict[int, list[Event]]:
    """`each` events for each of invoices 1..`invoices`, in the order they are to be published."""
    return {i: [new_event(settings, i) for _ in range(each)] for i in range(1, invoices + 1)}


def ids(events: list[Event]) -> list[str]:
    return [e.message_id for e in events]


def of_key(events: list[Event], key: str) -> list[str]:
    """Ids of the events with this ordering key, in list order."""
    return [e.message_id for e in events if e.key == key]


def of_invoice(events: list[Event], invoice: int) -> list[str]:
    """Ids of the events on `invoice`, in list order, by the Activity's InvoiceId as the test sent
    it: an expectation independent of relay's ordering keys (`of_key` is not, so comparing it
    with deliveries filtered by relay's key would hide a message keyed wrongly)."""
    return [e.message_id for e in events if e.data["InvoiceId"] == invoice]


# --- broker -----------------------------------------------------------------------------------


async def queue_depth(channel: AbstractChannel, name: str) -> int:
    """Ready messages in a queue (unacked ones are not counted)."""
    queue = await channel.declare_queue(name, passive=True)
    count = queue.declaration_result.message_count
    assert count is not None
    return count


async def depth_is(channel: AbstractChannel, name: str, depth: int) -> bool:
    return await queue_depth(channel, name) == depth


@contextlib.asynccontextmanager
async def steady_stream(
    publish: Callable[..., Awaitable[None]], settings: Settings, *, invoices: int, per_second: float
) -> AsyncIterator[list[Event]]:
    """Publishes events round-robin over invoices 1..`invoices` at a steady rate while the block
    runs; yields the list of those published (each confirmed), in publish order."""
    published: list[Event] = []
    stop = asyncio.Event()

    async def run() -> None:
        for invoice in itertools.cycle(range(1, invoices + 1)):
            event = new_event(settings, invoice)
            await publish(settings, event)
            published.append(event)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / per_second)  # the pace, or stop
            if stop.is_set():
                return

    task = asyncio.create_task(run())
    try:
        yield published
    finally:
        stop.set()
        await task  # the last publish completes: `published` is exactly what the broker has


class RunningWorker:
    """A Worker running as a task, as `relay worker` runs it."""

    def __init__(self, settings: Settings) -> None:
        self.worker = Worker(settings)
        self.task = asyncio.create_task(self.worker.async_run())

    @property
    def consuming(self) -> bool:
        return self.worker.ready.is_set()

    async def started(self) -> None:
        await eventually(lambda: self.consuming or self.task.done(), what="worker consuming")
        if self.task.done():
            self.task.result()  # raises what the worker died of
            raise AssertionError("worker returned before consuming")

    async def stop(self) -> None:
        self.worker.stop()
        done, _ = await asyncio.wait({self.task}, timeout=STOP_WITHIN)
        assert done, f"worker did not stop within {STOP_WITHIN}s"
        self.task.result()


def logged(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    """The captured log lines (see the `logs` fixture) of one event, in order."""
    return [line for line in logs if line["event"] == event]


# --- the relay command ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return self.stdout.splitlines()


async def relay_command(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> Completed:
    """`python -m relay ARGS` from the repository root, no stdin; killed if it outlives `timeout`
    or the test."""
    base = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**base, **(env or {})},
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())


def run_relay(
    *args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m relay ARGS` from the repository root, without $RELAY_CONFIG, with a deadline."""
    base = {k: v for k, v in os.environ.items() if k not in ("RELAY_CONFIG", *unset)}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**base, **(env or {})},
        check=False,
    )


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


def management(url: str) -> aiohttp.ClientSession:
    """The management API of the broker at AMQP `url`, as its user."""
    parts = urlsplit(url)
    login = f"{parts.username or 'guest'}:{parts.password or 'guest'}"
    return aiohttp.ClientSession(
        base_url=f"http://{parts.hostname}:15672",
        headers={"Authorization": "Basic " + base64.b64encode(login.encode()).decode()},
        timeout=aiohttp.ClientTimeout(10),
    )
