"""Signature schemes: computing and checking webhook signatures, in constant time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import string
from collections.abc import Iterable

from relay.settings import Secret

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


def standard_webhooks_key(secret: Secret) -> bytes:
    """Standard Webhooks: a `whsec_` secret is base64 after the prefix, else its UTF-8 bytes."""
    if secret.value.startswith("whsec_"):
        return base64.b64decode(secret.value.removeprefix("whsec_"))
    return secret.value.encode()


def standard_webhooks_signature(secret: Secret, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(standard_webhooks_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
