"""Delivering one message to one handler, over HTTP or to a Python callable, and the outcome."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Protocol

import aiohttp
import orjson

from relay import tracing, wire
from relay.errors import ConfigError, Reject, Retry
from relay.secrets import standard_webhooks_key
from relay.settings import HandlerSettings
from relay.signatures import standard_webhooks_signature

TRANSIENT_4XX = frozenset({408, 409, 425, 429})
RESPONSE_READ_BYTES = 4096  # of a handler's answer, at most this much is read (never inflated)
DETAIL_CHARS = 200  # of which at most this much goes into the outcome's detail


class Verdict(StrEnum):
    SUCCESS = "success"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    detail: str  # "HTTP 503", "timeout", "Reject: no such invoice", ...
    status: int | None = None
    retry_after: float | None = None


class Target(Protocol):
    async def deliver(
        self, body: bytes, message_id: str, attempt: int, replay: str = ""
    ) -> Outcome: ...


async def attempt_delivery(
    target: Target, body: bytes, message_id: str, attempt: int, replay: str = ""
) -> Outcome:
    """One delivery's outcome, whatever happens: an exception a target did not expect (a header
    value the HTTP client refuses, say) fails this message for good, never the worker.
    `replay`: the id of the replay sending it again, if one does."""
    try:
        return await target.deliver(body, message_id, attempt, replay)
    except Exception as exc:
        return Outcome(Verdict.PERMANENT, f"cannot deliver: {type(exc).__name__}: {exc}"[:300])


def classify(status: int, retry_after: str | None = None, answer: bytes = b"") -> Outcome:
    """2xx is success; 3xx (redirects are not followed) and 4xx but 408/409/425/429 are
    permanent; anything else is transient. `answer`, the start of the body, goes into the detail
    of a failure."""
    if 200 <= status < 300:
        return Outcome(Verdict.SUCCESS, f"HTTP {status}", status)
    detail = f"HTTP {status}"
    if 300 <= status < 400:
        detail += " (redirects are not followed)"
    if answer:
        detail += ": " + answer[:DETAIL_CHARS].decode("utf-8", "replace")
    if 300 <= status < 500 and status not in TRANSIENT_4XX:
        return Outcome(Verdict.PERMANENT, detail, status)
    return Outcome(Verdict.TRANSIENT, detail, status, parse_retry_after(retry_after))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` of delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    if re.fullmatch(r"\s*\d+\s*", value, re.ASCII):
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HttpTarget:
    """POSTs the message body with Standard Webhooks headers."""

    def __init__(self, handler: HandlerSettings, session: aiohttp.ClientSession) -> None:
        assert handler.url is not None
        self._url = handler.url
        secret = handler.signing_secret
        self._key = standard_webhooks_key(secret) if secret is not None else None
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=handler.timeout_seconds)

    async def deliver(
        self, body: bytes, message_id: str, attempt: int, replay: str = ""
    ) -> Outcome:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            wire.ATTEMPT_HTTP_HEADER: str(attempt),
        }
        if replay:  # a receiver that drops ids it has seen must take this one again
            headers[wire.REPLAYED_HEADER] = replay
        if tracing.ON:  # the attempt's span: the handler's own spans join the webhook's trace
            headers.update(tracing.carrier())
        if self._key is not None:
            headers["webhook-signature"] = standard_webhooks_signature(
                self._key, message_id, timestamp, body
            )
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                answer = await _read_start(response)
                return classify(response.status, response.headers.get("Retry-After"), answer)
        except TimeoutError:
            return Outcome(Verdict.TRANSIENT, "timeout")
        except aiohttp.ClientError as exc:
            return Outcome(Verdict.TRANSIENT, f"{type(exc).__name__}: {exc}")


async def _read_start(response: aiohttp.ClientResponse) -> bytes:
    """At most RESPONSE_READ_BYTES of the answer, raw. A longer answer is not read further: its
    connection is closed instead of reused."""
    start = b""
    while len(start) <= RESPONSE_READ_BYTES:
        chunk = await response.content.read(RESPONSE_READ_BYTES + 1 - len(start))
        if not chunk:
            return start
        start += chunk
    response.close()
    return start


class CallTarget:
    """Awaits `func(body_dict)`; `Retry` is transient, `Reject` permanent, returning is success."""

    def __init__(self, handler: HandlerSettings, key: str) -> None:
        assert handler.call is not None
        self._func = load_callable(handler.call, key)
        self._timeout = handler.timeout_seconds

    async def deliver(
        self, body: bytes, message_id: str, attempt: int, replay: str = ""
    ) -> Outcome:
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # the same bytes will never decode
            return Outcome(Verdict.PERMANENT, f"body is not JSON: {exc}")
        try:
            async with asyncio.timeout(self._timeout):
                await self._func(message)
        except Retry as exc:
            return Outcome(Verdict.TRANSIENT, f"Retry: {exc}", retry_after=exc.after_seconds)
        except Reject as exc:
            return Outcome(Verdict.PERMANENT, f"Reject: {exc}")
        except TimeoutError:
            return Outcome(Verdict.TRANSIENT, "timeout")
        except Exception as exc:  # a handler bug may be fixed: retry rather than lose the message
            return Outcome(Verdict.TRANSIENT, f"{type(exc).__name__}: {exc}")
        return Outcome(Verdict.SUCCESS, "returned")


def load_callable(spec: str, key: str) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    module_name, _, name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), name)
    except Exception as exc:  # whatever importing the module raised
        raise ConfigError(f"{key}: cannot import {spec!r}: {type(exc).__name__}: {exc}") from None
    if not inspect.iscoroutinefunction(func):
        raise ConfigError(f"{key}: {spec!r} is not an async function")
    return func  # type: ignore[no-any-return]
