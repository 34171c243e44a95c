"""What every scheme does with a request: parse the body strictly, check that it can be
forwarded, read headers and timestamps, name the event, its id and its key, and quote input in
errors without echoing it whole."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson

from relay.errors import BadPayload, BadSignature, ConfigError
from relay.providers.base import Request

MAX_DEPTH = 64  # levels of nesting a payload may have: every JSON library downstream reads it
MAX_NAME = 200  # characters of an id, event name or key: they go into AMQP short strings
# An event name becomes routing key words: no empty word, no wildcard, no space or control.
_EVENT_RE = re.compile(r"[^.*#\s\x00-\x1f\x7f]+(?:\.[^.*#\s\x00-\x1f\x7f]+)*")
_UNIX_RE = re.compile(r"\d{1,12}", re.ASCII)


def parse_json(raw: bytes, what: str = "body") -> Any:
    """`raw` as JSON, strictly: no invalid UTF-8, lone surrogates, NaN, infinite numbers, or
    nesting beyond MAX_DEPTH."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadPayload(f"{what} is not valid JSON: {exc.msg}") from None
    check_depth(value, what)
    return value


def within_tolerance(sent_at: float, now: float, tolerance: int | None, what: str) -> None:
    """Refuse a request whose timestamp is more than `tolerance` seconds from now, either way
    (0 or None: no check)."""
    if tolerance and abs(now - sent_at) > tolerance:
        raise BadSignature(f"{what}: outside the tolerance of {tolerance}s")


def check_depth(value: Any, field: str) -> None:
    """Refuse data nested deeper than MAX_DEPTH: every JSON library downstream can read it."""
    level = [value]
    for _ in range(MAX_DEPTH):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return
    raise BadPayload(f"{field}: nested deeper than {MAX_DEPTH} levels")


def clip(text: str, limit: int = 64) -> str:
    """`text` for an error message or log line: repr'd, and cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def header(request: Request, name: str) -> str:
    """A header a signature needs: missing or empty is a 401 naming it."""
    value = request.headers.get(name, "").strip()
    if not value:
        raise BadSignature(f"{name}: missing header")
    return value


def unix_time(value: str, what: str) -> int:
    """A timestamp in unix seconds, as signature schemes send it; else a 401 naming `what`."""
    if not _UNIX_RE.fullmatch(value):
        raise BadSignature(f"{what}: expected unix seconds")
    return int(value)


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def event_name(value: Any, what: str) -> str:
    """A provider's event name as routing key words (`invoice.paid`, `orders/create`)."""
    if not isinstance(value, str) or len(value) > MAX_NAME or not _EVENT_RE.fullmatch(value):
        raise BadPayload(
            f"{what}: expected an event name of dot-separated words without spaces, * or #"
        )
    return value


def identifier(value: Any, what: str) -> str:
    """An event id or ordering key: a non-empty string or an integer, at most MAX_NAME long."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise BadPayload(f"{what}: expected a string of 1 to {MAX_NAME} characters")
    if not value.isprintable():
        raise BadPayload(f"{what}: must not contain control characters")
    return value


# A reference to a value of a request: a dotted JSON path into the body (`data.object.id`),
# or `header:<Name>`.
def check_reference(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip(". ") or ".." in value:
        raise ConfigError(f"{key}: expected a dotted JSON path (data.id) or header:<Name>")
    return value


def lookup(reference: str, request: Request, body: Any) -> Any:
    """The value `reference` names, or None where it is absent."""
    if reference.startswith("header:"):
        return request.headers.get(reference[7:])
    value = body
    for part in reference.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def reference_name(reference: str) -> str:
    """A reference as errors name it: `X-Topic` for a header, `body.data.id` for a path."""
    return reference[7:] if reference.startswith("header:") else f"body.{reference}"


def place(
    body: dict[str, Any], headers: MutableMapping[str, str], reference: str, value: Any
) -> None:
    """Put `value` where `reference` looks for it: what a sender does, for samples."""
    if reference.startswith("header:"):
        headers[reference[7:]] = str(value)
        return
    *parents, last = reference.split(".")
    for part in parents:
        if not isinstance(body.get(part), dict):
            body[part] = {}
        body = body[part]
    body[last] = value
