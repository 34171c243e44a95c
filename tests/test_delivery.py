"""Delivery: outcome classification, Standard Webhooks signatures, HTTP and Python targets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
import standardwebhooks
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.errors import ConfigError, Reject, Retry
from relay.secrets import Secret, standard_webhooks_key
from relay.settings import HandlerSettings
from relay.signatures import standard_webhooks_signature
from relay.worker.delivery import (
    CallTarget,
    HttpTarget,
    Outcome,
    Verdict,
    classify,
    load_callable,
    parse_retry_after,
)

S, T, P = Verdict.SUCCESS, Verdict.TRANSIENT, Verdict.PERMANENT
BODY = json.dumps(
    {"id": "envoice:1", "key": "invoice:42", "data": {"Message": "Plaćeno €  ok"}},
    ensure_ascii=False,
    indent=1,
).encode()


def handler(**settings: Any) -> HandlerSettings:
    return HandlerSettings(name="h", events=("envoice.#",), bindings=("envoice.#",), **settings)


def expected_signature(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """Standard Webhooks, computed independently of relay."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# --- outcomes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, S), (204, S), (301, P), (400, P), (401, P), (404, P), (408, T), (409, T),
        (410, P), (422, P), (425, T), (429, T), (500, T), (502, T), (503, T),
    ],
)  # fmt: skip
def test_classify(status: int, verdict: Verdict) -> None:
    outcome = classify(status)

    assert (outcome.verdict, outcome.status) == (verdict, status)
    assert outcome.detail.startswith(f"HTTP {status}")


@pytest.mark.parametrize(
    ("status", "retry_after"), [(503, 7.0), (429, 7.0), (200, None), (404, None)]
)
def test_classify_honours_retry_after_on_transient_answers(
    status: int, retry_after: float | None
) -> None:
    assert classify(status, "7").retry_after == retry_after


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: retry now
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("²", None),  # str.isdigit() accepts it, float() does not
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_parse_retry_after_http_date_in_the_future() -> None:
    in_two_minutes = formatdate(time.time() + 120, usegmt=True)

    assert parse_retry_after(in_two_minutes) == pytest.approx(120, abs=5)


# --- Standard Webhooks signature ----------------------------------------------------------------


def test_standard_webhooks_published_example() -> None:
    key = standard_webhooks_key(Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"))

    signature = standard_webhooks_signature(
        key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )

    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_" + base64.b64encode(bytes(range(7, 39))).decode(),
        base64.b64encode(b"plain base64, no prefix").decode(),
        "whsec_c2VjcmV0",  # unpadded: the library pads it
        "my-dev-secret",  # not base64 at all: the library skips '-' and reads the rest
    ],
)
def test_standard_webhooks_secret_is_read_as_the_reference_library_reads_it(secret: str) -> None:
    signature = standard_webhooks_signature(
        standard_webhooks_key(Secret(secret)), "envoice:1", 1764331200, BODY
    )

    reference = standardwebhooks.Webhook(secret)
    stamp = datetime.fromtimestamp(1764331200, UTC)
    assert signature == reference.sign("envoice:1", stamp, BODY.decode())
    assert signature == expected_signature(
        base64.b64decode(secret.removeprefix("whsec_") + "=="), "envoice:1", 1764331200, BODY
    )


@pytest.mark.parametrize("secret", ["whsec_", "whsec_abcde", "Zm9vY", "sécret"])
def test_standard_webhooks_secret_the_library_cannot_read_is_refused(secret: str) -> None:
    with pytest.raises(ConfigError, match="whsec_<base64> or base64"):
        standard_webhooks_key(Secret(secret))


# --- HTTP handlers ----------------------------------------------------------------------------


@dataclass
class Hook:
    """A loopback webhook receiver: records requests, answers as told, or never answers."""

    url: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    hook = Hook()
    release = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        hook.requests.append((dict(request.headers), await request.read()))
        if hook.hang:
            await release.wait()
        return web.Response(status=hook.status, headers=hook.headers)

    app = web.Application()
    app.router.add_post("/hooks", receive)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    hook.url = str(server.make_url("/hooks"))
    try:
        yield hook
    finally:
        release.set()
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_http_delivery_sends_standard_webhooks_headers(
    hook: Hook, session: aiohttp.ClientSession
) -> None:
    key = b"0123456789abcdef0123456789abcdef"
    secret = Secret("whsec_" + base64.b64encode(key).decode())
    target = HttpTarget(handler(url=hook.url, signing_secret=secret), session)

    outcome = await target.deliver(BODY, "envoice:9001", 3)

    assert outcome == Outcome(S, "HTTP 200", 200)
    [(headers, body)] = hook.requests
    assert body == BODY
    assert headers["Content-Type"] == "application/json"
    assert headers["webhook-id"] == "envoice:9001"
    assert headers["x-relay-attempt"] == "3"
    timestamp = headers["webhook-timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    assert headers["webhook-signature"] == expected_signature(key, "envoice:9001", timestamp, BODY)


async def test_http_delivery_without_signing_secret_is_unsigned(
    hook: Hook, session: aiohttp.ClientSession
) -> None:
    await HttpTarget(handler(url=hook.url), session).deliver(BODY, "envoice:1", 1)

    [(headers, _)] = hook.requests
    assert "webhook-signature" not in headers
    assert headers["x-relay-attempt"] == "1"


async def test_a_replayed_delivery_says_which_replay_sends_it_again(
    hook: Hook, session: aiohttp.ClientSession
) -> None:
    target = HttpTarget(handler(url=hook.url), session)

    await target.deliver(BODY, "envoice:1", 1)
    await target.deliver(BODY, "envoice:1", 1, "6dd6017fb72f")

    [(first, _), (again, _)] = hook.requests
    assert "x-relay-replayed" not in first
    assert again["x-relay-replayed"] == "6dd6017fb72f"
    assert again["webhook-id"] == "envoice:1"


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (204, {}, Outcome(S, "HTTP 204", 204)),
        (404, {"Retry-After": "30"}, Outcome(P, "HTTP 404", 404)),
        (503, {"Retry-After": "30"}, Outcome(T, "HTTP 503", 503, 30.0)),
        (429, {"Retry-After": "5"}, Outcome(T, "HTTP 429", 429, 5.0)),
        (503, {"Retry-After": "²"}, Outcome(T, "HTTP 503", 503)),
        (301, {"Location": "/elsewhere"}, Outcome(P, "HTTP 301 (redirects are not followed)", 301)),
    ],
)
async def test_http_delivery_outcome_follows_the_answer(
    hook: Hook,
    session: aiohttp.ClientSession,
    status: int,
    headers: dict[str, str],
    expected: Outcome,
) -> None:
    hook.status, hook.headers = status, headers

    outcome = await HttpTarget(handler(url=hook.url), session).deliver(BODY, "envoice:1", 1)

    assert outcome == expected
    assert len(hook.requests) == 1  # redirects are not followed


async def test_http_delivery_timeout_is_transient(
    hook: Hook, session: aiohttp.ClientSession
) -> None:
    hook.hang = True
    target = HttpTarget(handler(url=hook.url, timeout_seconds=0.2), session)

    outcome = await target.deliver(BODY, "envoice:1", 1)

    assert outcome == Outcome(T, "timeout")


async def test_http_delivery_connection_refused_is_transient(
    session: aiohttp.ClientSession,
) -> None:
    target = HttpTarget(handler(url="http://127.0.0.1:1/hooks"), session)

    outcome = await target.deliver(BODY, "envoice:1", 1)

    assert (outcome.verdict, outcome.status) == (T, None)
    assert outcome.detail.startswith("ClientConnectorError")


# --- Python handlers --------------------------------------------------------------------------


async def succeed(message: dict[str, Any]) -> None:
    assert message["id"] == "envoice:1"


async def ask_retry(message: dict[str, Any]) -> None:
    raise Retry("busy", after_seconds=2.5)


async def ask_retry_later(message: dict[str, Any]) -> None:
    raise Retry("busy")


async def reject(message: dict[str, Any]) -> None:
    raise Reject(f"no such invoice {message['key']}")


async def crash(message: dict[str, Any]) -> None:
    raise KeyError("boom")


async def hang(message: dict[str, Any]) -> None:
    await asyncio.Event().wait()


def not_async(message: dict[str, Any]) -> None:
    """A plain function: not a valid handler."""


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        ("succeed", Outcome(S, "returned")),
        ("ask_retry", Outcome(T, "Retry: busy", retry_after=2.5)),
        ("ask_retry_later", Outcome(T, "Retry: busy")),
        ("reject", Outcome(P, "Reject: no such invoice invoice:42")),
        ("crash", Outcome(T, "KeyError: 'boom'")),
        ("hang", Outcome(T, "timeout")),
    ],
)
async def test_call_delivery_outcome(func: str, expected: Outcome) -> None:
    target = CallTarget(handler(call=f"{__name__}:{func}", timeout_seconds=0.1), "handlers[0].call")

    assert await target.deliver(BODY, "envoice:1", 1) == expected


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("relay_no_such_module.handlers:deliver", "cannot import"),
        (f"{__name__}:no_such_function", "cannot import"),
        (f"{__name__}:not_async", "is not an async function"),
        (f"{__name__}:BODY", "is not an async function"),
    ],
)
def test_unloadable_callable_is_a_config_error(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"^handlers\[0\]\.call: .*{problem}"):
        CallTarget(handler(call=spec), "handlers[0].call")
    with pytest.raises(ConfigError, match=rf"^some\.key: .*{problem}"):
        load_callable(spec, "some.key")
