"""The GitHub scheme: `X-Hub-Signature-256: sha256=<hex>` (HMAC-SHA256 of the raw body), the
event in `X-GitHub-Event` plus the body's `action`, the id in `X-GitHub-Delivery`.

GitHub sends no timestamp, so there is no replay window: a replayed delivery keeps its
`X-GitHub-Delivery` id and is answered `duplicate` while the id is in the duplicate window, and
handlers drop repeats by `webhook-id`. The event and delivery headers are not signed.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict

from relay.errors import BadPayload, BadSignature, ConfigError
from relay.providers.base import Event, Request
from relay.providers.payload import event_name, header, identifier, parse_json
from relay.signatures import any_digest_matches, decode_digest, hmac_sha256

if TYPE_CHECKING:
    from relay.settings import SourceSettings

DEFAULT_TOLERANCE = 0  # no timestamp to check


def options(source: SourceSettings, key: str) -> None:
    for name in source.options:
        raise ConfigError(f"{key}.{name}: unknown key (the github scheme has no options)")
    if source.tolerance_seconds:
        raise ConfigError(f"{key}.tolerance_seconds: GitHub sends no timestamp; remove it")


def event_names(source: SourceSettings) -> list[str]:
    return []  # open: GitHub adds events and actions


def parse(request: Request, source: SourceSettings, now: float) -> Event:
    """Verify the signature over the raw body, then name the event and its repository."""
    prefix, _, hexdigest = header(request, "X-Hub-Signature-256").partition("=")
    digest = decode_digest(hexdigest, "hex") if prefix == "sha256" else None
    if digest is None:
        raise BadSignature("X-Hub-Signature-256: expected sha256=<hex>")
    keys = [secret.value.encode() for secret in source.secrets]
    if not any_digest_matches([digest], keys, request.body):
        raise BadSignature("X-Hub-Signature-256: does not match")
    event = request.headers.get("X-GitHub-Event")
    delivery = request.headers.get("X-GitHub-Delivery")
    if not event:
        raise BadPayload("X-GitHub-Event: missing header")
    if not delivery:
        raise BadPayload("X-GitHub-Delivery: missing header")
    if "form-urlencoded" in request.headers.get("Content-Type", ""):
        raise BadPayload(
            "body is a form: set the GitHub webhook's content type to application/json"
        )
    body = parse_json(request.body)
    if not isinstance(body, dict):
        raise BadPayload("body must be a JSON object")
    action = body.get("action")
    name = f"{event}.{action}" if isinstance(action, str) and action else event
    return Event(
        id=identifier(delivery, "X-GitHub-Delivery"),
        source=source.name,
        name=event_name(name, "X-GitHub-Event and body.action"),
        type=None,
        key=identifier(_key(body) or delivery, "body.repository.full_name"),
        occurred_at=None,
        data=body,
        data_json=request.body,
    )


def _key(body: dict[str, Any]) -> str | None:
    """The repository's full name; else the organization's or account's login."""
    for owner, name in (("repository", "full_name"), ("organization", "login")):
        value = body.get(owner)
        if isinstance(value, dict) and isinstance(value.get(name), str):
            return str(value[name])
    return None


def sample(
    source: SourceSettings, *, event_id: int, key: int, now: float, occurred: float | None = None
) -> Request:
    """A signed `issues.opened` delivery for repository `example/repo-<key>` (no time in it:
    `occurred` changes nothing)."""
    body = orjson.dumps(
        {
            "action": "opened",
            "issue": {"number": event_id % 100_000, "title": f"Sample issue {event_id}"},
            "repository": {"full_name": f"example/repo-{key}", "private": False},
            "sender": {"login": "octocat"},
        }
    )
    signature = hmac_sha256(source.secrets[0].value.encode(), body).hex()
    headers = CIMultiDict(
        {
            "Content-Type": "application/json",
            "X-GitHub-Event": "issues",
            "X-GitHub-Delivery": str(uuid.UUID(int=event_id)),
            "X-Hub-Signature-256": f"sha256={signature}",
        }
    )
    return Request(body, headers)
