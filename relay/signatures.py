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


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def any_digest_matches(given: Iterable[bytes], keys: Iterable[bytes], message: bytes) -> bool:
    """True when one of the `given` digests is the HMAC-SHA256 of `message` under one of the
    `keys`. Every pair is compared in constant time, so timing tells neither which matched."""
    expected = [hmac_sha256(key, message) for key in keys]
    matched = False
    for digest in given:
        for wanted in expected:
            matched |= hmac.compare_digest(digest, wanted)
    return matched


def decode_digest(text: str, encoding: str) -> bytes | None:
    """A signature as senders write it (`hex`: lowercase; `base64`: standard, padded), as
    bytes; None when it is not one. Only the canonical spelling is read, so that a signature
    changed in any character does not match."""
    try:
        digest = bytes.fromhex(text) if encoding == "hex" else base64.b64decode(text, validate=True)
    except ValueError:
        return None
    canonical = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    return digest if canonical == text else None


def standard_webhooks_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`;
    `key` as `relay.secrets.standard_webhooks_key` reads it."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac_sha256(key, signed)).decode()
