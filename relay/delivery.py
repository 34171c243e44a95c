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

from relay.errors import ConfigError, Reject, Retry
from relay.settings import HandlerSettings
from relay.verify import standard_webhooks_signature

TRANSIENT_4XX = frozenset({408, 409, 425, 429})


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
    async def deliver(self, body: bytes, message_id: str, attempt: int) -> Outcome: ...


def classify(status: int, retry_after: str | None = None) -> Outcome:
    """2xx is success; 4xx but 408/409/425/429 is permanent; anything else is transient."""
    if 200 <= status < 300:
        return Outcome(Verdict.SUCCESS, f"HTTP {status}", status)
    if 400 <= status < 500 and status not in TRANSIENT_4XX:
        return Outcome(Verdict.PERMANENT, f"HTTP {status}", status)
    return Outcome(Verdict.TRANSIENT, f"HTTP {status}", status, parse_retry_after(retry_after))


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
        self._secret = handler.signing_secret
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=handler.timeout_seconds)

    async def deliver(self, body: bytes, message_id: str, attempt: int) -> Outcome:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "x-relay-attempt": str(attempt),
        }
        if self._secret is not None:
            headers["webhook-signature"] = standard_webhooks_signature(
                self._secret, message_id, timestamp, body
            )
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                await response.read()
                return classify(response.status, response.headers.get("Retry-After"))
        except TimeoutError:
            return Outcome(Verdict.TRANSIENT, "timeout")
        except aiohttp.ClientError as exc:
            return Outcome(Verdict.TRANSIENT, f"{type(exc).__name__}: {exc}")


class CallTarget:
    """Awaits `func(body_dict)`; `Retry` is transient, `Reject` permanent, returning is success."""

    def __init__(self, handler: HandlerSettings, key: str) -> None:
        assert handler.call is not None
        self._func = load_callable(handler.call, key)
        self._timeout = handler.timeout_seconds

    async def deliver(self, body: bytes, message_id: str, attempt: int) -> Outcome:
        try:
            async with asyncio.timeout(self._timeout):
                await self._func(orjson.loads(body))
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
