"""The Envoice provider: signature recipe, payload validation, event names, samples."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from relay.errors import BadPayload, BadSignature, ConfigError
from relay.providers.base import Event, Request
from relay.providers.payload import check_depth, clip, within_tolerance
from relay.signatures import hex_signature, hex_signature_matches

if TYPE_CHECKING:
    from relay.settings import SourceSettings

# Envoice re-sends past activities after an outage and does not say whether Timestamp is the
# send time, so a window could refuse a catch-up: the check is off unless a source sets one.
DEFAULT_TOLERANCE = 0
ALGORITHMS = ("hmac-sha256", "sha256")


@dataclass(frozen=True, slots=True)
class Options:
    """An Envoice source's own settings: the signature recipe, and type names."""

    signature_template: str = "{Timestamp}.{Activity}"  # {Activity}: its exact bytes
    signature_algorithm: str = "hmac-sha256"  # or sha256: digest of secret + message
    types: Mapping[int, str] = field(default_factory=dict)  # code -> PascalCase name
    # Every code's PascalCase name (the enum, overridden and extended by `types`), and event name
    names: Mapping[int, str] = field(init=False, repr=False, compare=False)
    events: Mapping[int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = {**dict(enumerate(TYPE_NAMES)), **self.types}
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "events", {code: snake_case(n) for code, n in names.items()})


def options(source: SourceSettings, key: str) -> Options:
    raw: Mapping[str, Any] = source.options
    for name in raw:
        if name not in ("signature_template", "signature_algorithm", "types"):
            raise ConfigError(f"{key}.{name}: unknown key")
    default = Options()
    template = raw.get("signature_template", default.signature_template)
    if not isinstance(template, str) or "{Activity}" not in template:
        raise ConfigError(f"{key}.signature_template: must be a string containing {{Activity}}")
    algorithm = raw.get("signature_algorithm", default.signature_algorithm)
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"{key}.signature_algorithm: expected one of {', '.join(ALGORITHMS)}")
    types = raw.get("types", {})
    if not isinstance(types, dict):
        raise ConfigError(f"{key}.types: expected a table")
    for code, name in types.items():
        if not re.fullmatch(r"\d+", code, re.ASCII) or not str(name).isidentifier():
            raise ConfigError(f'{key}.types.{code}: expected <integer> = "TypeName"')
    return Options(template, algorithm, {int(code): name for code, name in types.items()})


# The Activity Type enum of Envoice's OpenAPI spec, in order from 0 (docs/CONFIGURATION.md,
# "Routing").
TYPE_NAMES = (  # noqa: SIM905 - one compact, diffable list
    "Created Draft Cloned SentViaEmail SentViaSms SentReminderViaEmail "
    "SentReminderViaSms Opened Viewed Rejected Updated Paid Unpaid Overdue "
    "NewManualPayment NewPaymentWithPaypal NewPaymentWithStripe NewPaymentWithPayoneer "
    "SentToAccountant DownloadedAsPdf MarkAsPaidByTheClient OpenedAttachment "
    "NewPaymentWithSquare NewPaymentWithKlikAndPay NewPaymentWithRazorpay "
    "NewPaymentWithWepay NewPaymentWithHalkbank ChangeStatus OrderUpdated OrderCreated "
    "NewPaymentWithTwoCheckout NewPaymentWithPaymentWall NewPaymentWithBamboraEU "
    "NewPaymentWithBamboraNA Void NewPaymentWithNlb NewPaymentWithAuthorizeNet "
    "NewPaymentWithBraintree EstimationCreated EstimationDraft EstimationCloned "
    "EstimationSentViaEmail EstimationOpened EstimationViewed EstimationAccepted "
    "EstimationRejected EstimationUpdated EstimationDownloadedAsPdf "
    "InvoiceDigitallySigned"
).split()

# .NET-style timestamps: up to 7 fractional digits, `Z` or an offset (UTC when absent).
_TIMESTAMP_RE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,7})?(?:Z|[+-]\d\d:\d\d)?", re.ASCII
)
_PLACEHOLDER_RE = re.compile(r"(\{Timestamp\}|\{Activity\})")
# Envoice's own layout: Signature, Timestamp (no escapes), then Activity, the last member.
_USUAL_RE = re.compile(
    rb'\A_\{_"Signature"_:_"([0-9A-Fa-f]*)"_,_"Timestamp"_:_"([0-9A-Za-z:.+-]*)"_,'
    rb'_"Activity"_:_(\{.*\})_\}_\Z'.replace(b"_", rb"[ \t\n\r]*"),  # _: JSON whitespace
    re.DOTALL,
)


_WS = " \t\n\r"
_WS_RE = re.compile(r"[ \t\n\r]*")
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_SKIPPER = json.JSONDecoder(parse_constant=_reject_constant)  # top-level fields relay ignores
MAX_MEMBERS = 32  # top-level fields read before the body is refused: Envoice sends three

# Activity fields: name -> (accepted types, required)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "Id": ((int,), True),
    "Type": ((int, str), True),
    "CreatedOn": ((str,), True),
    "Message": ((str, type(None)), False),
    "Link": ((str, type(None)), False),
    "InvoiceNumber": ((str, type(None)), False),
    "InvoiceId": ((int, type(None)), False),
    "OrderNumber": ((str, type(None)), False),
    "OrderId": ((int, type(None)), False),
}


def snake_case(name: str) -> str:
    """`NewPaymentWithBamboraEU` -> `new_payment_with_bambora_eu`."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def event_names(source: SourceSettings) -> list[str]:
    return list(source.options.events.values())


def event_name(source: SourceSettings, code: int) -> str:
    return source.options.events.get(code) or f"type_{code}"


def parse(request: Request, source: SourceSettings, now: float) -> Event:
    """Verify the signature and validate the payload of one Envoice webhook."""
    recipe: Options = source.options
    fields, activity_raw = _fields(request.body)
    activity = fields.get("Activity")
    if not isinstance(activity, dict):
        raise BadPayload("Activity: required, must be an object")
    timestamp = fields.get("Timestamp")
    if not isinstance(timestamp, str):
        raise BadPayload("Timestamp: required, must be a string")
    signature = fields.get("Signature")
    if not isinstance(signature, str) or not signature:
        raise BadSignature("Signature: missing")
    message = _signed_message(recipe.signature_template, timestamp, activity_raw)
    if not hex_signature_matches(signature, recipe.signature_algorithm, source.secrets, message):
        raise BadSignature("Signature: does not match")
    sent_at = _parse_time(timestamp, "Timestamp")
    within_tolerance(sent_at.timestamp(), now, source.tolerance_seconds, "Timestamp")
    return _event(activity, activity_raw, source)


def _event(activity: dict[str, Any], raw: bytes, source: SourceSettings) -> Event:
    for name, (kinds, required) in _FIELDS.items():
        if name not in activity:
            if required:
                raise BadPayload(f"Activity.{name}: required")
            continue
        value = activity[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise BadPayload(f"Activity.{name}: must be {wanted}")
    _parse_time(activity["CreatedOn"], "Activity.CreatedOn")
    check_depth(activity, "Activity")
    code = _type_code(activity["Type"], source)
    activity_id = activity["Id"]
    if activity_id < 0:
        raise BadPayload("Activity.Id: must not be negative")
    if activity.get("InvoiceId"):
        key = f"invoice:{activity['InvoiceId']}"
    elif activity.get("OrderId"):
        key = f"order:{activity['OrderId']}"
    else:
        key = f"activity:{activity_id}"
    return Event(
        id=str(activity_id),
        source=source.name,
        name=event_name(source, code),
        type=code,
        key=key,
        occurred_at=activity["CreatedOn"],
        data=activity,
        data_json=raw,
    )


def _type_code(value: int | str, source: SourceSettings) -> int:
    if isinstance(value, int):
        if value < 0:
            raise BadPayload("Activity.Type: must not be negative")
        return value
    wanted = value.strip().lower()
    names: Mapping[int, str] = source.options.names
    for code, name in names.items():
        if name.lower() == wanted:
            return code
    raise BadPayload(f"Activity.Type: unknown type name {value[:64]!r}")


def _parse_time(value: str, field: str) -> datetime:
    try:
        if not _TIMESTAMP_RE.fullmatch(value):
            raise ValueError(value)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadPayload(
            f"{field}: expected an ISO 8601 timestamp like 2026-11-28T12:00:00Z"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _signed_message(template: str, timestamp: str, activity_raw: bytes) -> bytes:
    values = {"{Timestamp}": timestamp.encode(), "{Activity}": activity_raw}
    return b"".join(
        values[part] if part in values else part.encode()
        for part in _PLACEHOLDER_RE.split(template)
    )


def _fields(body: bytes) -> tuple[dict[str, Any], bytes]:
    """The top-level members of the body, and the exact bytes of the `Activity` value: Envoice's
    own layout by one regex and one parse, any other by `_top_level`."""
    usual = _USUAL_RE.match(body)
    if usual is not None:
        signature, timestamp, activity_raw = usual.groups()
        try:
            activity = orjson.loads(activity_raw)  # an object: the regex saw its braces
        except orjson.JSONDecodeError:
            pass  # perhaps more members after Activity: _top_level tells
        else:
            fields = {"Signature": signature.decode(), "Timestamp": timestamp.decode()}
            return {**fields, "Activity": activity}, activity_raw
    return _top_level(body)


def _top_level(body: bytes) -> tuple[dict[str, Any], bytes]:
    """The top-level members of the body, and the exact bytes of the `Activity` value.

    Cheap on hostile input: whitespace is skipped by a regex, at most MAX_MEMBERS members are
    read, and each value is parsed once by orjson, which refuses invalid UTF-8, lone surrogates,
    NaN, infinite numbers and nesting beyond 1024 levels.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPayload("body is not valid UTF-8") from None
    start, end = _skip(text, 0), len(text.rstrip(_WS)) - 1
    if text[start : start + 1] != "{":
        raise BadPayload("body must be a JSON object")
    if end <= start or text[end] != "}":
        raise BadPayload("body is not valid JSON")
    fields: dict[str, Any] = {}
    activity_raw = b""
    i = _skip(text, start + 1)
    while i < end:
        if fields:
            i = _skip(text, _expect(text, i, ","))
        if len(fields) == MAX_MEMBERS:
            raise BadPayload(f"body has more than {MAX_MEMBERS} top-level fields")
        match = _STRING_RE.match(text, i)
        if match is None:
            raise BadPayload("body is not valid JSON: expected a field name")
        key = _json_value(match.group())
        if key in fields:
            raise BadPayload(f"{clip(key)}: duplicate key")
        i = _skip(text, _expect(text, _skip(text, match.end()), ":"))
        fields[key], value_end = _value_at(text, i, end, parse=key == "Activity")
        if key == "Activity":
            activity_raw = text[i:value_end].encode()
        i = _skip(text, value_end)
    if i != end:
        raise BadPayload("body is not valid JSON")
    return fields, activity_raw


def _value_at(text: str, i: int, end: int, *, parse: bool) -> tuple[Any, int]:
    """The JSON value starting at `text[i]` and where it ends; `end` is the closing brace.

    Strings are matched by a regex. A value to `parse` goes to orjson, first as if it were the
    last member (one parse for Envoice's usual layout); any other value is only skipped.
    """
    match = _STRING_RE.match(text, i)
    if match is not None:
        return _json_value(match.group()), match.end()
    if not parse:
        try:
            return _SKIPPER.raw_decode(text, i)
        except (ValueError, RecursionError):
            raise BadPayload("body is not valid JSON") from None
    try:
        return orjson.loads(text[i:end]), len(text[:end].rstrip(_WS))
    except orjson.JSONDecodeError as exc:
        stop = i + exc.pos  # where the value (if it is one) was followed by more
        if text[stop : stop + 1] != ",":
            raise BadPayload(f"body is not valid JSON: {exc.msg}") from None
    value_end = len(text[:stop].rstrip(_WS))
    return _json_value(text[i:value_end]), value_end


def _json_value(raw: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadPayload(f"body is not valid JSON: {exc.msg}") from None


def _skip(text: str, i: int) -> int:
    return _WS_RE.match(text, i).end()  # type: ignore[union-attr]  # matches the empty string


def _expect(text: str, i: int, char: str) -> int:
    if text[i : i + 1] != char:
        raise BadPayload(f"body is not valid JSON: expected {char!r}")
    return i + 1


def sample(
    source: SourceSettings, *, event_id: int, key: int, now: float, occurred: float | None = None
) -> Request:
    """A signed Envoice webhook for invoice `key`, signed with the source's first secret at `now`
    (its Timestamp), the Activity created at `occurred` (default `now`), its Type a function of
    the id."""
    recipe: Options = source.options
    timestamp = _dotnet_time(now)
    created_on = timestamp if occurred is None else _dotnet_time(occurred)
    code = _SAMPLE_TYPES[(event_id * 0x9E3779B1 >> 16) % len(_SAMPLE_TYPES)]  # mixed, not random
    activity = orjson.dumps(
        {
            "Message": f"{TYPE_NAMES[code]} on invoice INV-{key}",
            "Link": f"https://app.envoice.example/invoices/{key}",
            "Type": code,
            "InvoiceNumber": f"INV-{key}",
            "InvoiceId": key,
            "OrderNumber": "",
            "OrderId": 0,
            "Id": event_id,
            "CreatedOn": created_on,
        }
    )
    message = _signed_message(recipe.signature_template, timestamp, activity)
    signature = hex_signature(recipe.signature_algorithm, source.secrets[0], message)
    head = orjson.dumps({"Signature": signature, "Timestamp": timestamp})
    body = head[:-1] + b',"Activity":' + activity + b"}"
    return Request(body, {"Content-Type": "application/json"})


_SAMPLE_TYPES = (0, 3, 7, 8, 10, 11, 14, 16)  # Created, SentViaEmail, ..., NewPaymentWithStripe


def _dotnet_time(seconds: float) -> str:
    """A unix time as Envoice writes it: UTC, 7 fractional digits, Z."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"
