"""Reading relay's envelope of an Envoice activity (relay/wire.py `envelope`):

    {"id": "envoice:9001", "source": "envoice", "event": "paid", "type": 11,
     "key": "invoice:42", "occurred_at": "2026-11-28T11:59:59.9Z",
     "received_at": "2026-11-28T12:00:00.123456Z",
     "data": {"Message": "...", "Link": "https://...", "Type": 11, "InvoiceNumber": "INV-7",
              "InvoiceId": 42, "OrderNumber": "", "OrderId": 0, "Id": 9001,
              "CreatedOn": "2026-11-28T11:59:59.9Z"}}

`data` is the Activity exactly as Envoice sent it (relay checked its fields' types); `event` is
its Type's snake_case name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class NotAnEnvelope(Exception):
    """The body is not relay's envelope of an Envoice activity."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Activity:
    """One Envoice activity as relay delivered it: what the store needs of it."""

    webhook_id: str  # relay's message id (envelope `id`, header `webhook-id`): "envoice:9001"
    id: int  # Activity.Id
    event: str  # the Type's name in snake_case: "paid", "sent_via_email", "type_77"
    type: int | None  # the Type's code
    invoice_id: int | None  # None (or 0 in the body): an activity about no invoice (an order's)
    invoice_number: str | None
    message: str | None
    link: str | None
    created_on: str  # Activity.CreatedOn, as Envoice wrote it
    received_at: str  # when relay accepted it


# The invoice's status after an activity of each event; events not listed leave it as it was
# (opened, viewed, reminders, updates, downloads, estimations, ...).
STATUS_AFTER = {
    "created": "draft",
    "draft": "draft",
    "cloned": "draft",
    "sent_via_email": "sent",
    "sent_via_sms": "sent",
    "rejected": "rejected",
    "paid": "paid",
    "mark_as_paid_by_the_client": "paid",
    "unpaid": "unpaid",
    "overdue": "overdue",
    "void": "void",
}


def status_after(event: str) -> str | None:
    """The status an activity of `event` gives its invoice; None: it leaves it unchanged."""
    if event.startswith("new_payment_with_") or event == "new_manual_payment":
        return "paid"
    return STATUS_AFTER.get(event)


def read(body: bytes, webhook_id: str) -> Activity:
    """The activity in relay's envelope `body`, delivered as `webhook_id`; raises NotAnEnvelope."""
    try:
        envelope = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise NotAnEnvelope("body is not JSON") from None
    if not isinstance(envelope, dict):
        raise NotAnEnvelope("body is not a JSON object")
    if _required(envelope, "id", str) != webhook_id:
        raise NotAnEnvelope("id: differs from webhook-id")
    data = envelope.get("data")
    if not isinstance(data, dict):
        raise NotAnEnvelope("data: expected the Envoice Activity, an object")
    activity_id = _required(data, "Id", int, "data.")
    if activity_id < 0:
        raise NotAnEnvelope("data.Id: must not be negative")
    return Activity(
        webhook_id=webhook_id,
        id=activity_id,
        event=_required(envelope, "event", str),
        type=_optional(envelope, "type", int),
        invoice_id=_optional(data, "InvoiceId", int, "data.") or None,
        invoice_number=_optional(data, "InvoiceNumber", str, "data."),
        message=_optional(data, "Message", str, "data."),
        link=_optional(data, "Link", str, "data."),
        created_on=_required(data, "CreatedOn", str, "data."),
        received_at=_required(envelope, "received_at", str),
    )


def _required(fields: dict[str, Any], name: str, kind: type[T], where: str = "") -> T:
    value = fields.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise NotAnEnvelope(f"{where}{name}: expected {kind.__name__}")
    return value


def _optional(fields: dict[str, Any], name: str, kind: type[T], where: str = "") -> T | None:
    if fields.get(name) is None:
        return None
    return _required(fields, name, kind, where)
