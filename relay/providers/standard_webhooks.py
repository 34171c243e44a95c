"""The Standard Webhooks scheme (standardwebhooks.com): `webhook-id`, `webhook-timestamp` and
`webhook-signature` headers, HMAC-SHA256 over `{id}.{timestamp}.{body}`, base64, secrets read as
the reference `standardwebhooks` library reads them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
from relay.secrets import standard_webhooks_key
from relay.signatures import any_digest_matches, decode_digest, standard_webhooks_signature

if TYPE_CHECKING:
    from relay.settings import SourceSettings

DEFAULT_TOLERANCE = 300
MAX_SIGNATURES = 16  # entries of webhook-signature looked at: rotation needs two or three


@dataclass(frozen=True, slots=True)
class Options:
    keys: tuple[bytes, ...] = field(repr=False)  # the secrets as HMAC keys
    event_path: str = "type"  # where the event name is: a JSON path, or header:<Name>
    key_path: str | None = None  # where the ordering key is; None: the webhook-id


def options(source: SourceSettings, key: str) -> Options:
    raw: Mapping[str, Any] = source.options
    for name in raw:
        if name not in ("event_path", "key_path"):
            raise ConfigError(f"{key}.{name}: unknown key")
    keys = []
    for i, secret in enumerate(source.secrets):
        try:
            keys.append(standard_webhooks_key(secret))
        except ConfigError as exc:
            raise ConfigError(f"{key}.secrets[{i}]: {exc}") from None
    key_path = raw.get("key_path")
    return Options(
        tuple(keys),
        check_reference(raw.get("event_path", "type"), f"{key}.event_path"),
        None if key_path is None else check_reference(key_path, f"{key}.key_path"),
    )


def event_names(source: SourceSettings) -> list[str]:
    return []  # open: the event names come from the payloads


def parse(request: Request, source: SourceSettings, now: float) -> Event:
    """Verify the signature headers and read the event, as the reference library does."""
    recipe: Options = source.options
    msg_id = header(request, "webhook-id")
    timestamp = unix_time(header(request, "webhook-timestamp"), "webhook-timestamp")
    given = []
    for entry in header(request, "webhook-signature").split()[:MAX_SIGNATURES]:
        version, _, signature = entry.partition(",")
        digest = decode_digest(signature, "base64") if version == "v1" else None
        if digest is not None:
            given.append(digest)
    if not given:
        raise BadSignature("webhook-signature: expected space-separated v1,<base64> entries")
    signed = f"{msg_id}.{timestamp}.".encode() + request.body
    if not any_digest_matches(given, recipe.keys, signed):
        raise BadSignature("webhook-signature: does not match")
    within_tolerance(timestamp, now, source.tolerance_seconds, "webhook-timestamp")
    body = parse_json(request.body)
    if not isinstance(body, dict):
        raise BadPayload("body must be a JSON object")
    key_path = recipe.key_path
    occurred_at = body.get("timestamp")
    return Event(
        id=identifier(msg_id, "webhook-id"),
        source=source.name,
        name=event_name(
            lookup(recipe.event_path, request, body), reference_name(recipe.event_path)
        ),
        type=None,
        key=msg_id
        if key_path is None
        else identifier(lookup(key_path, request, body), reference_name(key_path)),
        occurred_at=occurred_at if isinstance(occurred_at, str) else rfc3339(timestamp),
        data=body,
        data_json=request.body,
    )


def sample(
    source: SourceSettings, *, event_id: int, key: int, now: float, occurred: float | None = None
) -> Request:
    """A signed `invoice.paid` webhook for invoice `key`, as a Standard Webhooks sender makes it
    (the event and key where the source's options look for them)."""
    recipe: Options = source.options
    when = now if occurred is None else occurred
    payload: dict[str, Any] = {"type": "invoice.paid", "timestamp": rfc3339(when)}
    payload["data"] = {"invoice_id": key, "amount": 1200 + event_id % 100}
    headers = CIMultiDict({"Content-Type": "application/json"})
    place(payload, headers, recipe.event_path, "invoice.paid")
    if recipe.key_path is not None:
        place(payload, headers, recipe.key_path, f"invoice:{key}")
    body = orjson.dumps(payload)
    msg_id, timestamp = f"msg_{event_id}", int(now)
    headers["webhook-id"] = msg_id
    headers["webhook-timestamp"] = str(timestamp)
    secret = standard_webhooks_key(source.secrets[0])  # the first, as `relay send` gives it
    headers["webhook-signature"] = standard_webhooks_signature(secret, msg_id, timestamp, body)
    return Request(body, headers)
