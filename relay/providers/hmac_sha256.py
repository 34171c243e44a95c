"""The generic `hmac-sha256` scheme, for providers without a scheme of their own: an HMAC-SHA256
of the raw body (optionally with a timestamp header, by a template) in a configurable header, hex
or base64, behind an optional prefix; id, event and key read from JSON paths or headers."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict

from relay.errors import BadPayload, BadSignature, ConfigError
from relay.providers.base import Event, Request
from relay.providers.payload import (
    check_reference,
    event_name,
    header,
    identifier,
    lookup,
    parse_json,
    place,
    reference_name,
    rfc3339,
    unix_time,
    within_tolerance,
)
from relay.signatures import any_digest_matches, decode_digest, hmac_sha256

if TYPE_CHECKING:
    from relay.settings import SourceSettings

DEFAULT_TOLERANCE = 300  # used when the source has a timestamp_header
ENCODINGS = ("hex", "base64")
_PLACEHOLDER_RE = re.compile(r"(\{timestamp\}|\{body\})")
KEYS = (
    "signature_header", "signature_prefix", "signature_encoding", "timestamp_header",
    "signed_payload", "id_path", "event_path", "key_path",
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    signature_header: str  # e.g. X-Signature
    signature_prefix: str = ""  # e.g. sha256=
    signature_encoding: str = "hex"  # or base64
    timestamp_header: str | None = None  # unix seconds, signed through the template
    signed_payload: str = "{body}"  # what is signed: {body} and {timestamp}
    id_path: str = "id"  # JSON path into the body, or header:<Name>
    event_path: str = "type"
    key_path: str | None = None  # None: the id


def options(source: SourceSettings, key: str) -> Options:
    raw: Mapping[str, Any] = source.options
    for name in raw:
        if name not in KEYS:
            raise ConfigError(f"{key}.{name}: unknown key (expected one of {', '.join(KEYS)})")
    strings = {name: raw[name] for name in KEYS if name in raw}
    for name, value in strings.items():
        if not isinstance(value, str) or (name != "signature_prefix" and not value.strip()):
            raise ConfigError(f"{key}.{name}: expected a non-empty string")
    if "signature_header" not in strings:
        raise ConfigError(f"{key}.signature_header: required (the header carrying the signature)")
    if strings.get("signature_encoding", "hex") not in ENCODINGS:
        raise ConfigError(f"{key}.signature_encoding: expected one of {', '.join(ENCODINGS)}")
    timestamped = "timestamp_header" in strings
    template = strings.setdefault(
        "signed_payload", "{timestamp}.{body}" if timestamped else "{body}"
    )
    if "{body}" not in template:
        raise ConfigError(f"{key}.signed_payload: must contain {{body}}")
    if ("{timestamp}" in template) != timestamped:
        raise ConfigError(
            f"{key}.signed_payload: {{timestamp}} must appear exactly when timestamp_header is set"
        )
    if source.tolerance_seconds and not timestamped:
        raise ConfigError(f"{key}.tolerance_seconds: needs a timestamp_header to check")
    for name in ("id_path", "event_path", "key_path"):
        if name in strings:
            check_reference(strings[name], f"{key}.{name}")
    return Options(**strings)


def event_names(source: SourceSettings) -> list[str]:
    return []  # open: the event names come from the payloads


def parse(request: Request, source: SourceSettings, now: float) -> Event:
    """Verify the signature over the raw body (and timestamp), then read id, event and key."""
    recipe: Options = source.options
    name = recipe.signature_header
    sent = header(request, name)
    if not sent.startswith(recipe.signature_prefix):
        raise BadSignature(
            f"{name}: expected {recipe.signature_prefix}<{recipe.signature_encoding}>"
        )
    digest = decode_digest(sent[len(recipe.signature_prefix) :], recipe.signature_encoding)
    if digest is None:
        raise BadSignature(
            f"{name}: expected {recipe.signature_prefix}<{recipe.signature_encoding}>"
        )
    timestamp = None
    if recipe.timestamp_header is not None:
        timestamp = unix_time(header(request, recipe.timestamp_header), recipe.timestamp_header)
    keys = [secret.value.encode() for secret in source.secrets]
    if not any_digest_matches(
        [digest], keys, _signed(recipe.signed_payload, timestamp, request.body)
    ):
        raise BadSignature(f"{name}: does not match")
    if timestamp is not None:
        within_tolerance(timestamp, now, source.tolerance_seconds, recipe.timestamp_header or "")
    body = parse_json(request.body)
    if not isinstance(body, dict):
        raise BadPayload("body must be a JSON object")
    event_id = identifier(lookup(recipe.id_path, request, body), reference_name(recipe.id_path))
    key_path = recipe.key_path
    return Event(
        id=event_id,
        source=source.name,
        name=event_name(
            lookup(recipe.event_path, request, body), reference_name(recipe.event_path)
        ),
        type=None,
        key=event_id
        if key_path is None
        else identifier(lookup(key_path, request, body), reference_name(key_path)),
        occurred_at=None if timestamp is None else rfc3339(timestamp),
        data=body,
        data_json=request.body,
    )


def _signed(template: str, timestamp: int | None, body: bytes) -> bytes:
    values = {"{timestamp}": str(timestamp).encode(), "{body}": body}
    return b"".join(
        values[part] if part in values else part.encode()
        for part in _PLACEHOLDER_RE.split(template)
    )


def sample(
    source: SourceSettings, *, event_id: int, key: int, now: float, occurred: float | None = None
) -> Request:
    """A signed `invoice.paid` webhook for invoice `key`, its id, event and key where the
    source's options look for them (no time in the body: `occurred` changes nothing)."""
    recipe: Options = source.options
    payload: dict[str, Any] = {"data": {"invoice_id": key, "amount": 1200}}
    headers = CIMultiDict({"Content-Type": "application/json"})
    place(payload, headers, recipe.id_path, f"evt_{event_id}")
    place(payload, headers, recipe.event_path, "invoice.paid")
    if recipe.key_path is not None:
        place(payload, headers, recipe.key_path, f"invoice:{key}")
    body = orjson.dumps(payload)
    timestamp = None
    if recipe.timestamp_header is not None:
        timestamp = int(now)
        headers[recipe.timestamp_header] = str(timestamp)
    digest = hmac_sha256(
        source.secrets[0].value.encode(), _signed(recipe.signed_payload, timestamp, body)
    )
    encoded = (
        digest.hex() if recipe.signature_encoding == "hex" else base64.b64encode(digest).decode()
    )
    headers[recipe.signature_header] = recipe.signature_prefix + encoded
    return Request(body, headers)
