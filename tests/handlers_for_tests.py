"""Handlers for the worker and end-to-end tests: they record what they get and fail on demand.

- `record` is a Python handler (`call = "tests.handlers_for_tests:record"`): every call lands in
  `calls`; `failures[message_id]` lists what to raise on that message's next calls, in turn.
- `HttpHandler` is a real aiohttp server on a loopback port: every request lands in `requests`;
  `answers[message_id]` lists the answers to give that message's next requests (a status, a
  `(status, headers)` pair, or `HANG`), then it answers 200.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
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


HANG = "hang"  # an answer that never comes: the request hangs until the server closes
Answer = int | tuple[int, dict[str, str]] | str


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the handler server saw it."""

    at: float  # time.monotonic() on arrival
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed

    @property
    def id(self) -> str:
        return str(self.json["id"])

    @property
    def attempt(self) -> int:
        return int(self.headers["x-relay-attempt"])


class HttpHandler:
    """A downstream HTTP handler that records requests and answers as planned."""

    path = "/hooks/envoice"

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answers: dict[str, list[Answer]] = {}
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

    async def _receive(self, request: web.Request) -> web.Response:
        received = Request(
            at=time.monotonic(),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
        )
        self.requests.append(received)
        planned = self.answers.get(received.id)
        answer = planned.pop(0) if planned else 200
        if answer == HANG:
            await self._closing.wait()
            answer = 503
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return web.Response(status=int(status), headers=headers)
