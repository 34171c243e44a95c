"""The schemes beyond Envoice, checked against code relay did not write: the `standardwebhooks`
and `stripe` packages sign, GitHub's documented example verifies, the standard library's `hmac`
signs the generic scheme. Then: one changed byte is a 401, a rotated secret is a 200, the
timestamp window works both ways, and each scheme names its event, id and ordering key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import standardwebhooks
import stripe
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from relay.config import from_dict as config_from_dict
from relay.errors import BadPayload, BadSignature, ConfigError
from relay.providers import PROVIDERS, Event, Request
from relay.settings import SourceSettings
from tests.support import ROOT, FakePublisher, running_ingress

NOW = time.time()
WHSEC = ["whsec_" + base64.b64encode(b"first secret, 24 bytes!!").decode(),
         "whsec_" + base64.b64encode(b"second, rotated secret").decode()]  # fmt: skip
PLAIN = ["It's a Secret to Everybody", "a rotated secret"]
STRIPE = ["whsec_test_first", "whsec_test_rotated"]

SOURCES: dict[str, dict[str, Any]] = {
    "standard-webhooks": {"secrets": WHSEC, "key_path": "data.invoice"},
    "github": {"secrets": PLAIN},
    "stripe": {"secrets": STRIPE},
    "hmac-sha256": {
        "secrets": PLAIN, "signature_header": "X-Signature", "signature_prefix": "sha256=",
        "timestamp_header": "X-Timestamp", "key_path": "data.account",
    },
}  # fmt: skip


def make_source(scheme: str, **overrides: Any) -> SourceSettings:
    """A source of `scheme` (SOURCES), with `overrides`; an override of None removes a key."""
    source = {"name": "src", "path": "/hooks", "scheme": scheme, **SOURCES[scheme], **overrides}
    source = {name: value for name, value in source.items() if value is not None}
    return config_from_dict({"sources": [source]}).sources[0]


def parse(request: Request, source: SourceSettings, now: float = NOW) -> Event:
    return PROVIDERS[source.scheme].parse(request, source, now)


# --- signers relay did not write --------------------------------------------------------------


def standard_webhook(
    body: bytes, *, secret: str = WHSEC[0], msg_id: str = "msg_2Kd", timestamp: float = NOW
) -> Request:
    """Signed by the reference `standardwebhooks` library."""
    sent = datetime.fromtimestamp(timestamp, UTC)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, sent, body.decode())
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": signature,
    }
    return Request(body, CIMultiDict(headers))


def github_delivery(
    body: bytes, *, secret: str = PLAIN[0], event: str = "pull_request", delivery: str = "d-1"
) -> Request:
    """Signed as GitHub documents it: `sha256=` + hex HMAC-SHA256 of the body."""
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "X-Hub-Signature-256": f"sha256={signature}",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "Content-Type": "application/json",
    }
    return Request(body, CIMultiDict(headers))


def stripe_event(body: bytes, *, secret: str = STRIPE[0], timestamp: float = NOW) -> Request:
    """Signed by the `stripe` package's own helper."""
    header = stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp=int(timestamp)
    )
    return Request(body, CIMultiDict({"Stripe-Signature": header}))


def generic_webhook(
    body: bytes,
    *,
    secret: str = PLAIN[0],
    timestamp: float = NOW,
    encode: Callable[[bytes], str] = bytes.hex,
) -> Request:
    """Signed with the standard library: HMAC-SHA256 of `<timestamp>.<body>`."""
    signed = f"{int(timestamp)}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    headers = {"X-Signature": "sha256=" + encode(digest), "X-Timestamp": str(int(timestamp))}
    return Request(body, CIMultiDict(headers))


def invoice_paid(**fields: Any) -> bytes:
    return orjson.dumps({"type": "invoice.paid", "id": "evt_1",
                         "data": {"invoice": "in_42", "account": "acct_7"}, **fields})  # fmt: skip


def pull_request() -> bytes:
    return orjson.dumps(
        {"action": "opened", "number": 7, "repository": {"full_name": "octo-org/hello-world"}}
    )


def stripe_body(obj: dict[str, Any] | None = None, **fields: Any) -> bytes:
    obj = {"id": "in_1", "object": "invoice", "customer": "cus_9"} if obj is None else obj
    event = {"id": "evt_1N", "object": "event", "type": "invoice.paid", "created": 1764000000}
    return orjson.dumps({**event, "data": {"object": obj}, **fields})


# A valid request per scheme, signed with the first or the rotated secret.
# Signed with secret number i, at `at` (default NOW, the time `parse` checks against).
SIGNED: dict[str, Callable[..., Request]] = {
    "standard-webhooks": lambda i, at=NOW: standard_webhook(
        invoice_paid(), secret=WHSEC[i], timestamp=at
    ),
    "github": lambda i, at=NOW: github_delivery(pull_request(), secret=PLAIN[i]),
    "stripe": lambda i, at=NOW: stripe_event(stripe_body(), secret=STRIPE[i], timestamp=at),
    "hmac-sha256": lambda i, at=NOW: generic_webhook(invoice_paid(), secret=PLAIN[i], timestamp=at),
}
# The headers a signature covers, per scheme (GitHub signs the body only).
SIGNED_HEADERS = {
    "standard-webhooks": ["webhook-id", "webhook-timestamp", "webhook-signature"],
    "github": ["X-Hub-Signature-256"],
    "stripe": ["Stripe-Signature"],
    "hmac-sha256": ["X-Signature", "X-Timestamp"],
}


# --- implementations relay did not write sign, relay verifies ---------------------------------


@pytest.mark.parametrize("secret", [WHSEC[0], WHSEC[0].removeprefix("whsec_"), "c2VjcmV0IGtleQ"])
def test_standard_webhooks_reads_secrets_as_the_reference_library(secret: str) -> None:
    # whsec_<base64>, plain base64, and unpadded base64: each as the library reads it
    source = make_source("standard-webhooks", secrets=[secret])

    event = parse(standard_webhook(invoice_paid(), secret=secret, msg_id="msg_77"), source)

    assert (event.id, event.name, event.key) == ("msg_77", "invoice.paid", "in_42")
    assert event.message_id == "src:msg_77"
    assert event.data_json == invoice_paid()


def test_standard_webhooks_defaults_event_to_type_and_key_to_the_id() -> None:
    source = make_source("standard-webhooks", key_path=None)
    body = invoice_paid(timestamp="2026-11-30T10:00:00Z")

    event = parse(standard_webhook(body, msg_id="msg_9"), source)

    assert (event.name, event.key, event.occurred_at) == ("invoice.paid", "msg_9",
                                                          "2026-11-30T10:00:00Z")  # fmt: skip


def test_standard_webhooks_any_entry_of_the_signature_header_may_match() -> None:
    request = standard_webhook(invoice_paid())
    headers = CIMultiDict(request.headers)
    headers["webhook-signature"] = "v1,Zm9v v2,abc " + headers["webhook-signature"]

    assert parse(Request(request.body, headers), make_source("standard-webhooks")).id == "msg_2Kd"


def test_a_standard_webhooks_secret_that_is_not_base64_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^sources\[0\]\.secrets\[0\]: expected whsec_") as exc:
        make_source("standard-webhooks", secrets=["whsec_!!!"])
    assert "!!!" not in str(exc.value)


def test_githubs_documented_example_verifies() -> None:
    # GitHub's "Validating webhook deliveries" test values
    source = make_source("github", secrets=["It's a Secret to Everybody"])
    signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    headers = {"X-Hub-Signature-256": signature, "X-GitHub-Event": "ping", "X-GitHub-Delivery": "1"}
    request = Request(b"Hello, World!", CIMultiDict(headers))

    # the signature matches (the body then is not JSON: a 400, not a 401)
    with pytest.raises(BadPayload, match=r"^body is not valid JSON"):
        parse(request, source)
    with pytest.raises(BadSignature, match=r"^X-Hub-Signature-256: does not match$"):
        parse(request, make_source("github", secrets=["another secret"]))


def test_github_names_the_event_with_its_action_and_keys_by_repository() -> None:
    event = parse(github_delivery(pull_request(), delivery="72d3162e"), make_source("github"))

    assert (event.id, event.name, event.key) == ("72d3162e", "pull_request.opened",
                                                 "octo-org/hello-world")  # fmt: skip
    assert event.routing_key == "src.pull_request.opened"


@pytest.mark.parametrize(
    ("body", "name", "key"),
    [
        ({"ref": "refs/heads/main", "repository": {"full_name": "o/r"}}, "push", "o/r"),
        (
            {"action": "created", "organization": {"login": "octo-org"}},
            "member.created",
            "octo-org",
        ),
        ({"zen": "Keep it logically awesome."}, "member", "d-1"),
    ],
)
def test_github_without_action_or_repository(body: dict[str, Any], name: str, key: str) -> None:
    event_header = name.split(".")[0]
    event = parse(github_delivery(orjson.dumps(body), event=event_header), make_source("github"))

    assert (event.name, event.key) == (name, key)


def test_a_github_form_encoded_delivery_says_to_send_json() -> None:
    request = github_delivery(b"payload=%7B%7D")
    headers = CIMultiDict(request.headers)
    headers["Content-Type"] = "application/x-www-form-urlencoded"

    with pytest.raises(BadPayload, match="content type to application/json"):
        parse(Request(request.body, headers), make_source("github"))


def test_a_github_source_refuses_a_tolerance_it_cannot_check() -> None:
    with pytest.raises(ConfigError, match=r"^sources\[0\]\.tolerance_seconds: GitHub sends no"):
        make_source("github", tolerance_seconds=300)


def test_stripe_verifies_what_the_stripe_package_signs() -> None:
    event = parse(stripe_event(stripe_body()), make_source("stripe"))

    assert (event.id, event.name, event.key) == ("evt_1N", "invoice.paid", "cus_9")
    assert event.occurred_at == "2025-11-24T16:00:00Z"


def test_relays_stripe_sample_verifies_with_the_stripe_package() -> None:
    source = make_source("stripe")
    sample = PROVIDERS["stripe"].sample(source, event_id=1, key=2, now=time.time())

    event = stripe.Webhook.construct_event(
        sample.body.decode(), sample.headers["Stripe-Signature"], STRIPE[0]
    )
    assert event["data"]["object"]["customer"] == "cus_2"


@pytest.mark.parametrize(
    ("obj", "key"),
    [
        ({"id": "in_1", "customer": "cus_9"}, "cus_9"),  # the customer's events stay in order
        ({"id": "in_1", "customer": {"id": "cus_8", "object": "customer"}}, "cus_8"),  # expanded
        ({"id": "cus_9", "object": "customer"}, "cus_9"),  # customer.updated: the same key
        ({"id": "prod_1", "customer": None}, "prod_1"),
        ({"no_id": True}, "evt_1N"),
    ],
)
def test_stripe_keys_by_customer_else_object(obj: dict[str, Any], key: str) -> None:
    assert parse(stripe_event(stripe_body(obj)), make_source("stripe")).key == key


def test_stripe_several_v1_signatures_any_may_match() -> None:
    request = stripe_event(stripe_body(), secret=STRIPE[1])
    header = request.headers["Stripe-Signature"] + ",v1=" + "ab" * 32 + ",v0=" + "cd" * 32
    request = Request(request.body, CIMultiDict({"Stripe-Signature": header}))

    assert parse(request, make_source("stripe", secrets=[STRIPE[1]])).id == "evt_1N"


@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_generic_hmac_in_hex_or_base64(encoding: str) -> None:
    source = make_source("hmac-sha256", signature_encoding=encoding)
    encode = bytes.hex if encoding == "hex" else lambda d: base64.b64encode(d).decode()

    event = parse(generic_webhook(invoice_paid(), encode=encode), source)

    assert (event.id, event.name, event.key) == ("evt_1", "invoice.paid", "acct_7")


def test_generic_hmac_reads_id_and_event_from_headers() -> None:
    # a Shopify-like sender: base64 over the body, id and topic in headers
    source = make_source(
        "hmac-sha256", signature_header="X-Shop-Hmac", signature_prefix="",
        signature_encoding="base64", timestamp_header=None, id_path="header:X-Shop-Id",
        event_path="header:X-Shop-Topic", key_path="customer.id",
    )  # fmt: skip
    body = orjson.dumps({"customer": {"id": 55}, "total": "9.00"})
    digest = hmac.new(PLAIN[0].encode(), body, hashlib.sha256).digest()
    headers = {"X-Shop-Hmac": base64.b64encode(digest).decode(), "X-Shop-Id": "b54557e4",
               "X-Shop-Topic": "orders/create"}  # fmt: skip

    event = parse(Request(body, CIMultiDict(headers)), source)

    assert (event.id, event.name, event.key) == ("b54557e4", "orders/create", "55")
    assert event.occurred_at is None


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"signature_header": None}, r"signature_header: required"),
        ({"signature_encoding": "hexadecimal"}, r"signature_encoding: expected one of hex, base64"),
        ({"signed_payload": "{timestamp}"}, r"signed_payload: must contain \{body\}"),
        (
            {"signed_payload": "{body}"},
            r"signed_payload: \{timestamp\} must appear exactly when timestamp_header",
        ),
        (
            {"timestamp_header": None, "tolerance_seconds": 60},
            r"tolerance_seconds: needs a timestamp_header",
        ),
        ({"id_path": "data..id"}, r"id_path: expected a dotted JSON path"),
        ({"secret_encoding": "base64"}, r"secret_encoding: unknown key"),
    ],
)
def test_generic_hmac_config_errors_name_the_key(options: dict[str, Any], error: str) -> None:
    source = {**SOURCES["hmac-sha256"], **options}
    source = {k: v for k, v in source.items() if v is not None}
    raw = {"sources": [{"name": "g", "path": "/g", "scheme": "hmac-sha256", **source}]}

    with pytest.raises(ConfigError, match=r"^sources\[0\]\." + error):
        config_from_dict(raw)


# --- every scheme: rotation, one-byte changes, missing headers, the timestamp window -----------


@pytest.mark.parametrize("scheme", SIGNED)
def test_a_request_signed_with_a_rotated_secret_is_accepted(scheme: str) -> None:
    source = make_source(scheme)

    assert parse(SIGNED[scheme](0), source).id == parse(SIGNED[scheme](1), source).id


@pytest.mark.parametrize("scheme", SIGNED)
@given(data=st.data())
def test_changing_one_byte_of_what_is_signed_is_a_401(scheme: str, data: st.DataObject) -> None:
    source = make_source(scheme)
    request = SIGNED[scheme](data.draw(st.sampled_from([0, 1])))
    parts = ["body", *SIGNED_HEADERS[scheme]]
    part = data.draw(st.sampled_from(parts))
    original = request.body if part == "body" else request.headers[part].encode()
    position = data.draw(st.integers(0, len(original) - 1))
    byte = data.draw(st.integers(0x20, 0x7E).filter(lambda b: b != original[position]))
    changed = original[:position] + bytes([byte]) + original[position + 1 :]

    headers = CIMultiDict(request.headers)
    if part != "body":
        headers[part] = changed.decode()
    with pytest.raises(BadSignature):
        parse(Request(changed if part == "body" else request.body, headers), source)


@pytest.mark.parametrize(("scheme", "header"), [(s, h) for s in SIGNED for h in SIGNED_HEADERS[s]])
def test_a_missing_header_is_a_401_naming_it(scheme: str, header: str) -> None:
    request = SIGNED[scheme](0)
    headers = CIMultiDict(request.headers)
    del headers[header]

    with pytest.raises(BadSignature, match=f"^{header}: missing header$"):
        parse(Request(request.body, headers), make_source(scheme))


TIMESTAMPED: dict[str, Callable[[float], Request]] = {
    "standard-webhooks": lambda at: standard_webhook(invoice_paid(), timestamp=at),
    "stripe": lambda at: stripe_event(stripe_body(), timestamp=at),
    "hmac-sha256": lambda at: generic_webhook(invoice_paid(), timestamp=at),
}


@pytest.mark.parametrize("scheme", TIMESTAMPED)
@pytest.mark.parametrize("offset", [-3600, 3600])
def test_the_timestamp_window_works_both_ways(scheme: str, offset: int) -> None:
    request = TIMESTAMPED[scheme](NOW + offset)  # an hour in the future, or an hour old

    assert make_source(scheme).tolerance_seconds == 300  # the default
    with pytest.raises(BadSignature, match="outside the tolerance of 300s"):
        parse(request, make_source(scheme))
    assert parse(request, make_source(scheme, tolerance_seconds=0)).id


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_the_timestamp_window_edges(scheme: str) -> None:
    source = make_source(scheme)
    assert parse(TIMESTAMPED[scheme](int(NOW) - 300), source, now=int(NOW)).id
    with pytest.raises(BadSignature):
        parse(TIMESTAMPED[scheme](int(NOW) - 301), source, now=int(NOW))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"[1, 2]", r"^body must be a JSON object$"),
        (b'{"id": "e", "type": 3}', r"^body\.type: expected an event name"),
        (b'{"id": "e", "type": "invoice paid"}', r"^body\.type: expected an event name"),
        (b'{"id": "e", "type": "invoice.*"}', r"^body\.type: expected an event name"),
        (b'{"id": "e", "type": "a..b"}', r"^body\.type: expected an event name"),
        (b'{"id": "", "type": "a"}', r"^body\.id: expected a string of 1 to 200"),
        (b'{"id": "' + b"x" * 201 + b'", "type": "a"}', r"^body\.id: expected a string of 1 to"),
        (b'{"id": true, "type": "a"}', r"^body\.id: expected a string"),
        (b'{"id": "e", "type": "a", "data": {"account": {"x": 1}}}', r"^body\.data\.account:"),
    ],
)
def test_a_signed_body_relay_cannot_route_is_a_400_naming_the_field(
    body: bytes, error: str
) -> None:
    with pytest.raises(BadPayload, match=error):
        parse(generic_webhook(body), make_source("hmac-sha256"))


# --- over HTTP --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SIGNED)
async def test_each_scheme_over_http_accepts_signed_and_refuses_unsigned(scheme: str) -> None:
    raw = {"sources": [{"name": "src", "path": "/hooks", "scheme": scheme, **SOURCES[scheme]}],
           "ingress": {"host": "127.0.0.1", "port": 0}}  # fmt: skip
    settings = config_from_dict(raw)
    publisher = FakePublisher()
    request = SIGNED[scheme](1, time.time())  # the ingress checks against its own clock
    missing = SIGNED_HEADERS[scheme][-1]
    unsigned = {k: v for k, v in request.headers.items() if k.lower() != missing.lower()}

    async with running_ingress(settings, publisher=publisher) as ingress:
        accepted = await ingress.post("/hooks", request.body, request.headers)
        refused = await ingress.post("/hooks", request.body, unsigned)

    event = parse(request, settings.sources[0], now=time.time())
    assert accepted[:2] == (200, {"status": "accepted", "id": event.message_id})
    assert publisher.published == [event]
    assert refused[:2] == (401, {"error": f"{missing}: missing header"})
    secrets = [s.value for s in settings.sources[0].secrets]
    assert not any(secret in str(refused) for secret in secrets)


# --- the examples of docs/SOURCES.md --------------------------------------------------------------


def test_the_docs_show_a_working_source_for_each_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    page = (ROOT / "docs" / "SOURCES.md").read_text(encoding="utf-8")
    section = page.split("# Sources: the signature schemes")[1].split("\n## ")[0]
    sources = [tomllib.loads(block)["sources"][0]
               for block in re.findall(r"```toml\n(.*?)```", section, re.DOTALL)]  # fmt: skip
    for name in re.findall(r'"env:(\w+)"', section):
        monkeypatch.setenv(name, "whsec_c2VjcmV0IGtleQ==")
    patterns = [f"{source['name']}.#" for source in sources]
    handler = {"name": "all", "events": patterns, "call": "relay.handlers:log"}

    settings = config_from_dict({"sources": sources, "handlers": [handler]})

    assert sorted(s.scheme for s in settings.sources) == sorted(set(PROVIDERS) - {"envoice"})
    for source in settings.sources:  # each signs and verifies its own sample
        provider = PROVIDERS[source.scheme]
        event = provider.parse(provider.sample(source, event_id=1, key=2, now=NOW), source, NOW)
        assert event.routing_key.startswith(f"{source.name}.")
