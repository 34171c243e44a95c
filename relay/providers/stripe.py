"""The Stripe scheme: `Stripe-Signature: t=<ts>,v1=<hex>[,v1=...]`, HMAC-SHA256 of
`{t}.{raw body}` keyed by the endpoint secret (`whsec_...`, used as it is written).

The ordering key is the customer when the event's object has one (an invoice, a payment intent,
a subscription), else the object's id: a customer's events then reach a handler in order, the
customer's own (`customer.updated`) included, since a customer's id is its object id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict

from relay.errors import BadPayload, BadSignature, ConfigError
from relay.providers.base import Event, Request
from relay.providers.payload import (
    event_name,
    header,
    identifier,
    parse_json,
    rfc3339,
    unix_time,
    within_tolerance,
)
from relay.signatures import any_digest_matches, decode_digest, hmac_sha256

if TYPE_CHECKING:
    from relay.settings import SourceSettings

DEFAULT_TOLERANCE = 300
MAX_ITEMS = 16  # items of Stripe-Signature looked at: t, and v1 for each rolling secret


def options(source: SourceSettings, key: str) -> None:
    for name in source.options:
        raise ConfigError(f"{key}.{name}: unknown key (the stripe scheme has no options)")


def event_names(source: SourceSettings) -> list[str]:
    return []  # open: Stripe has hundreds of event types and adds more


def parse(request: Request, source: SourceSettings, now: float) -> Event:
    """Verify `Stripe-Signature` over the raw body, then read the event."""
    timestamp, given = None, []
    for item in header(request, "Stripe-Signature").split(",")[:MAX_ITEMS]:
        name, _, value = item.strip().partition("=")
        if name == "t":
            timestamp = unix_time(value, "Stripe-Signature t")
        elif name == "v1" and (digest := decode_digest(value, "hex")) is not None:
            given.append(digest)
    if timestamp is None or not given:
        raise BadSignature("Stripe-Signature: expected t=<unix seconds>,v1=<hex>")
    keys = [secret.value.encode() for secret in source.secrets]
    if not any_digest_matches(given, keys, f"{timestamp}.".encode() + request.body):
        raise BadSignature("Stripe-Signature: does not match")
    within_tolerance(timestamp, now, source.tolerance_seconds, "Stripe-Signature t")
    body = parse_json(request.body)
    if not isinstance(body, dict):
        raise BadPayload("body must be a JSON object")
    event_id = identifier(body.get("id"), "body.id")
    created = body.get("created")
    return Event(
        id=event_id,
        source=source.name,
        name=event_name(body.get("type"), "body.type"),
        type=None,
        key=_key(body) or event_id,
        occurred_at=rfc3339(created) if isinstance(created, int) and created >= 0 else None,
        data=body,
        data_json=request.body,
    )


def _key(body: dict[str, Any]) -> str | None:
    """`data.object.customer` (an id, or an expanded customer), else `data.object.id`."""
    data = body.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return None
    customer = obj.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    for value in (customer, obj.get("id")):
        if isinstance(value, str) and value:
            return identifier(value, "body.data.object")
    return None


def sample(
    source: SourceSettings, *, event_id: int, key: int, now: float, occurred: float | None = None
) -> Request:
    """A signed `invoice.paid` event for customer `cus_<key>`."""
    body = orjson.dumps(
        {
            "id": f"evt_{event_id}",
            "object": "event",
            "type": "invoice.paid",
            "created": int(now if occurred is None else occurred),
            "livemode": False,
            "data": {
                "object": {
                    "id": f"in_{event_id}",
                    "object": "invoice",
                    "customer": f"cus_{key}",
                    "amount_paid": 1200,
                }
            },
        }
    )
    timestamp = int(now)
    digest = hmac_sha256(source.secrets[0].value.encode(), f"{timestamp}.".encode() + body)
    headers = CIMultiDict(
        {"Content-Type": "application/json", "Stripe-Signature": f"t={timestamp},v1={digest.hex()}"}
    )
    return Request(body, headers)
