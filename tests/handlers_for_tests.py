"""Handlers for the worker and end-to-end tests: they record what they get and fail on demand.

- `record` is a Python handler (`call = "tests.handlers_for_tests:record"`): every call lands in
  `calls`; `failures[message_id]` lists what to raise on that message's next calls, in turn.
- `HttpHandler` is a real aiohttp server on a loopback port: every request lands in `requests`;
  `answers[message_id]` lists the answers to give that message's next requests (a status, a
  `(status, headers)` pair, `HANG` or a `Held`), then it answers `default` (200 unless told
  otherwise: set it to 503 for an outage, to 422 to reject everything).
- `journal` is a Python handler for worker subprocesses: it appends every call to a JSON-lines
  file and raises while a flag file exists (both named by environment variables).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

calls: list[dict[str, Any]] = []
failures: dict[str, list[Exception]] = {}


async def record(message: dict[str, Any]) -> None:
    """Records the message; raises the next planned failure for its id, if any."""
    calls.append(message)
    planned = failures.get(message["id"])
    if planned:
        raise planned.pop(0)


def reset() -> None:
    calls.clear()
    failures.clear()


JOURNAL_ENV = "RELAY_TEST_JOURNAL"  # the JSON-lines file `journal` appends to
BROKEN_ENV = "RELAY_TEST_BROKEN"  # while the file it names exists, `journal` raises


async def journal(message: dict[str, Any]) -> None:
    """Appends `{"id", "key", "ok"}` to $RELAY_TEST_JOURNAL; raises while $RELAY_TEST_BROKEN
    exists (a plain exception, as a handler bug would)."""
    if not _write_journal(message):
        raise RuntimeError("handler is broken")


def _write_journal(message: dict[str, Any]) -> bool:
    ok = not Path(os.environ[BROKEN_ENV]).exists()
    line = orjson.dumps({"id": message["id"], "key": message["key"], "ok": ok}) + b"\n"
    with Path(os.environ[JOURNAL_ENV]).open("ab") as out:  # one short line: no need for a thread
        out.write(line)
    return ok


HANG = "hang"  # an answer that never comes: the request hangs until the server closes


@dataclass(frozen=True, slots=True)
class Held:
    """An answer held back until `release` is set: the request stays in flight until then."""

    release: asyncio.Event
    then: int = 200


Answer = int | tuple[int, dict[str, str]] | str | Held


@dataclass(slots=True)
class Request:
    """One request as the handler server saw it, and the answer it got once given."""

    at: float  # time.monotonic() on arrival
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int | None = None  # the answer's status
    answered_at: float | None = None  # time.monotonic() when answered

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed

    id: str = field(init=False)  # the envelope's, read once: tests poll these many times
    key: str = field(init=False)

    def __post_init__(self) -> None:
        envelope = orjson.loads(self.body)
        self.id, self.key = str(envelope["id"]), str(envelope["key"])

    @property
    def attempt(self) -> int:
        return int(self.headers["x-relay-attempt"])

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class HttpHandler:
    """A downstream HTTP handler that records requests and answers as planned."""

    path = "/hooks/envoice"

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answers: dict[str, list[Answer]] = {}
        self.default: Answer = 200  # the answer when none is planned
        self.latency = 0.0  # seconds each request takes before it is answered
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post(self.path, self._receive)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.url = ""

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}{self.path}"

    async def close(self) -> None:
        self._closing.set()
        await self._runner.cleanup()

    async def __aenter__(self) -> HttpHandler:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def plan(self, message_id: str, answers: Iterable[Answer]) -> None:
        self.answers[message_id] = list(answers)

    def of(self, message_id: str) -> list[Request]:
        return [r for r in self.requests if r.id == message_id]

    def accepted(self, key: str | None = None) -> list[str]:
        """Ids of the requests answered 2xx (of one ordering key, if given), in arrival order."""
        return [r.id for r in self.requests if r.accepted and (key is None or r.key == key)]

    async def _receive(self, request: web.Request) -> web.Response:
        received = Request(
            at=time.monotonic(),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
        )
        self.requests.append(received)
        planned = self.answers.get(received.id)
        answer = planned.pop(0) if planned else self.default
        if self.latency:
            await asyncio.sleep(self.latency)
        if answer == HANG:
            await self._closing.wait()
            answer = 503
        if isinstance(answer, Held):
            await answer.release.wait()
            answer = answer.then
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        received.status, received.answered_at = int(status), time.monotonic()
        return web.Response(status=int(status), headers=headers)
