"""Checking relay's Standard Webhooks signature (`webhook-id`, `webhook-timestamp`,
`webhook-signature`), written out with the standard library: HMAC-SHA256, keyed by the
base64-decoded secret, over `{id}.{timestamp}.{body}`, base64, compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

TOLERANCE_SECONDS = 300  # as the reference library: relay stamps each attempt when it sends it
MAX_SIGNATURES = 16  # entries of webhook-signature looked at: rotation needs two or three


class BadSignature(Exception):
    """The request is not signed by relay with our secret (or not recently)."""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret, `whsec_<base64>` or plain base64, read as the
    reference `standardwebhooks` library (and relay) read it. Raises ValueError if it gives no
    key."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_") + "==")
    except (binascii.Error, ValueError):
        raise ValueError("signing secret: expected whsec_<base64> or base64") from None
    if not key:
        raise ValueError(
            "signing secret: expected whsec_<base64> or base64, which decodes to no key"
        )
    return key


def verify(key: bytes, headers: Mapping[str, str], body: bytes, now: float) -> str:
    """The request's webhook id, once its signature is checked; raises BadSignature."""
    webhook_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    given = headers.get("webhook-signature", "")
    if not webhook_id or not timestamp or not given:
        raise BadSignature("webhook-id, webhook-timestamp and webhook-signature are required")
    if not timestamp.isascii() or not timestamp.isdigit():
        raise BadSignature("webhook-timestamp: expected unix seconds")
    if abs(now - int(timestamp)) > TOLERANCE_SECONDS:
        raise BadSignature("webhook-timestamp: too old or too new")
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    matched = False
    for entry in given.split()[:MAX_SIGNATURES]:
        version, _, signature = entry.partition(",")
        # every entry is compared, so timing does not tell which one matched
        matched |= version == "v1" and hmac.compare_digest(signature.encode(), expected)
    if not matched:
        raise BadSignature("webhook-signature: does not match")
    return webhook_id
