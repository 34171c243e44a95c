"""Signature schemes: computing and checking webhook signatures, in constant time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import string
from collections.abc import Iterable

from relay.secrets import Secret

_HEX = frozenset(string.hexdigits)


def hex_signature(algorithm: str, secret: Secret, message: bytes) -> str:
    """`hmac-sha256` keyed by the secret, or `sha256` of secret + message; lowercase hex."""
    key = secret.value.encode()
    if algorithm == "hmac-sha256":
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    if algorithm == "sha256":
        return hashlib.sha256(key + message).hexdigest()
    raise ValueError(f"unknown signature algorithm {algorithm!r}")


def hex_signature_matches(
    given: str, algorithm: str, secrets: Iterable[Secret], message: bytes
) -> bool:
    """True when `given` (hex, any case) is the signature under any of the secrets."""
    if len(given) != 64 or not _HEX.issuperset(given):
        return False
    given = given.lower()
    matched = False
    for secret in secrets:  # every secret is tried, so timing does not tell which matched
        matched |= hmac.compare_digest(hex_signature(algorithm, secret, message), given)
    return matched


def standard_webhooks_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`;
    `key` as `relay.secrets.standard_webhooks_key` reads it."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
