"""Helpers for relay's tests: polling with a deadline, a TCP proxy to cut the broker, samples."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from relay.envoice import _signed_message
from relay.ingress import ACCEPTOR, create_app
from relay.settings import Settings, SourceSettings
from relay.verify import hex_signature


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
        "Id": int(time.time_ns() // 1000),
        "CreatedOn": "2026-11-28T11:59:59.9Z",
    }
    base.update(fields)
    return base


def now_timestamp(offset: float = 0.0) -> str:
    """A .NET-style UTC timestamp with 7 fractional digits."""
    t = time.time() + offset
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e7):07d}Z"


def signed_body(
    source: SourceSettings,
    act: dict[str, Any] | bytes,
    *,
    timestamp: str | None = None,
    secret_index: int = 0,
    signature: str | None = None,
) -> bytes:
    """A webhook body signed with the source's recipe; `act` may be raw Activity bytes."""
    timestamp = timestamp or now_timestamp()
    raw = act if isinstance(act, bytes) else orjson.dumps(act)
    if signature is None:
        message = _signed_message(source.signature_template, timestamp, raw)
        signature = hex_signature(source.signature_algorithm, source.secrets[secret_index], message)
    head = orjson.dumps({"Signature": signature, "Timestamp": timestamp})
    return head[:-1] + b',"Activity":' + raw + b"}"


@contextlib.asynccontextmanager
async def running_ingress(settings: Settings, *, ready: bool = True) -> AsyncIterator[Ingress]:
    """The ingress app on a loopback port, with a client; waits for the broker when `ready`."""
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession(base_url=str(server.make_url(""))) as client:
            ingress = Ingress(app, client)
            if ready:
                await eventually(lambda: app[ACCEPTOR].publisher.ready, what="ingress ready")
            yield ingress
    finally:
        await server.close()


class Ingress:
    def __init__(self, app: web.Application, client: ClientSession) -> None:
        self.app, self.client = app, client

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with self.client.post(path, data=body) as response:
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
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

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
