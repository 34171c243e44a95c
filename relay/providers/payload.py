"""What every scheme does with a payload: parse it strictly, check that it can be forwarded,
check a timestamp, and quote input in errors without echoing it whole."""

from __future__ import annotations

from typing import Any

import orjson

from relay.errors import BadPayload, BadSignature

MAX_DEPTH = 64  # levels of nesting a payload may have: every JSON library downstream reads it


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
