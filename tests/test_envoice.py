"""The Envoice provider: type names, signature recipe over raw bytes, payload validation."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from relay.config import from_dict as config_from_dict
from relay.errors import BadPayload, BadSignature
from relay.providers import Request, envoice
from relay.settings import SourceSettings
from tests.support import envoice_signature

TIMESTAMP = "2026-11-28T12:00:00.1234567Z"
NOW = datetime.fromisoformat("2026-11-28T12:00:00.123456+00:00").timestamp()
SECRETS = ["old-secret", "new-secret"]


def make_source(**overrides: Any) -> SourceSettings:
    source = {"name": "envoice", "path": "/e", "scheme": "envoice", "secrets": SECRETS}
    return config_from_dict({"sources": [{**source, **overrides}]}).sources[0]


SOURCE = make_source()


def activity(**fields: Any) -> dict[str, Any]:
    base = {
        "Message": "Invoice paid", "Link": "https://app.envoice.example/invoices/42", "Type": 11,
        "InvoiceNumber": "INV-42", "InvoiceId": 42, "OrderNumber": "", "OrderId": 0,
        "Id": 9001, "CreatedOn": "2026-11-28T11:59:59.9Z",
    }  # fmt: skip
    return {k: v for k, v in {**base, **fields}.items() if v is not ...}


def sign(
    raw: bytes,
    *,
    secret: str = SECRETS[0],
    timestamp: str = TIMESTAMP,
    template: str = "{Timestamp}.{Activity}",
    algorithm: str = "hmac-sha256",
) -> str:
    """The Envoice signature recipe of docs/SOURCES.md, computed independently of relay."""
    return envoice_signature(secret, timestamp, raw, template=template, algorithm=algorithm)


def webhook(
    act: dict[str, Any] | bytes | None = None,
    *,
    timestamp: str = TIMESTAMP,
    signature: str | None = None,
    **recipe: str,
) -> bytes:
    """A body: Activity bytes kept exactly as given, signed over them unless `signature`."""
    raw = act if isinstance(act, bytes) else json.dumps(activity() if act is None else act).encode()
    signature = sign(raw, timestamp=timestamp, **recipe) if signature is None else signature
    head = json.dumps({"Signature": signature, "Timestamp": timestamp})
    return head[:-1].encode() + b', "Activity": ' + raw + b"}"


def parse(body: bytes | Request, source: SourceSettings = SOURCE, now: float = NOW) -> Any:
    request = body if isinstance(body, Request) else Request(body, {})
    return envoice.parse(request, source, now)


# --- type names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "snake"),
    [
        ("Paid", "paid"),
        ("NewPaymentWithBamboraEU", "new_payment_with_bambora_eu"),
        ("NewPaymentWithBamboraNA", "new_payment_with_bambora_na"),
        ("NewPaymentWithTwoCheckout", "new_payment_with_two_checkout"),
        ("NewPaymentWithKlikAndPay", "new_payment_with_klik_and_pay"),
        ("SentViaSms", "sent_via_sms"),
        ("DownloadedAsPdf", "downloaded_as_pdf"),
        ("InvoiceDigitallySigned", "invoice_digitally_signed"),
        ("MarkAsPaidByTheClient", "mark_as_paid_by_the_client"),
        ("HTTPError", "http_error"),
        ("Type2Invoice", "type2_invoice"),
    ],
)
def test_snake_case(name: str, snake: str) -> None:
    assert envoice.snake_case(name) == snake


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (0, "Created"), (3, "SentViaEmail"), (11, "Paid"), (16, "NewPaymentWithStripe"),
        (27, "ChangeStatus"), (30, "NewPaymentWithTwoCheckout"), (34, "Void"),
        (38, "EstimationCreated"), (48, "InvoiceDigitallySigned"),
    ],
)  # fmt: skip
def test_type_enum_positions(code: int, name: str) -> None:
    assert envoice.TYPE_NAMES[code] == name


def test_type_enum_has_49_distinct_event_names() -> None:
    names = envoice.event_names(SOURCE)

    assert len(envoice.TYPE_NAMES) == 49
    assert len(set(names)) == 49


@pytest.mark.parametrize(
    ("types", "code", "event"),
    [
        ({}, 11, "paid"),
        ({}, 49, "type_49"),
        ({}, 77, "type_77"),
        ({"11": "Settled"}, 11, "settled"),
        ({"49": "InvoiceArchived"}, 49, "invoice_archived"),
    ],
)
def test_event_name(types: dict[str, str], code: int, event: str) -> None:
    assert envoice.event_name(make_source(types=types), code) == event


# --- a valid webhook --------------------------------------------------------------------------


def test_parse_builds_the_event() -> None:
    event = parse(webhook(activity(Type=16, InvoiceId=7, Id=123)))

    assert (event.id, event.source, event.type) == ("123", "envoice", 16)
    assert event.name == "new_payment_with_stripe"
    assert event.message_id == "envoice:123"
    assert event.routing_key == "envoice.new_payment_with_stripe"
    assert event.key == "invoice:7"
    assert event.occurred_at == "2026-11-28T11:59:59.9Z"
    assert event.data == activity(Type=16, InvoiceId=7, Id=123)


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"InvoiceId": 42, "OrderId": 7}, "invoice:42"),
        ({"InvoiceId": 0, "OrderId": 7}, "order:7"),
        ({"InvoiceId": None, "OrderId": 7}, "order:7"),
        ({"InvoiceId": ..., "OrderId": 7}, "order:7"),
        ({"InvoiceId": 0, "OrderId": 0}, "activity:9001"),
        ({"InvoiceId": None, "OrderId": None}, "activity:9001"),
        ({"InvoiceId": ..., "OrderId": ...}, "activity:9001"),
    ],
)
def test_ordering_key(fields: dict[str, Any], key: str) -> None:
    assert parse(webhook(activity(**fields))).key == key


def test_optional_fields_may_be_null_or_absent() -> None:
    act = activity(Message=None, Link=None, InvoiceNumber=..., OrderNumber=None)

    assert parse(webhook(act)).data == act


@pytest.mark.parametrize(
    ("type_", "code", "event"),
    [
        ("Paid", 11, "paid"),
        ("paid", 11, "paid"),
        ("PAID", 11, "paid"),
        (" NewPaymentWithBamboraEU ", 32, "new_payment_with_bambora_eu"),
        (77, 77, "type_77"),
        (0, 0, "created"),
    ],
)
def test_type_as_name_or_number(type_: int | str, code: int, event: str) -> None:
    parsed = parse(webhook(activity(Type=type_)))

    assert (parsed.type, parsed.name) == (code, event)


def test_type_name_from_the_source_types() -> None:
    source = make_source(types={"49": "InvoiceArchived"})

    parsed = parse(webhook(activity(Type="invoicearchived")), source)

    assert (parsed.type, parsed.name) == (49, "invoice_archived")


# --- the signature ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"Id":9001,"Type":11,"CreatedOn":"2026-11-28T11:59:59.9Z"}',
        b'{\n  "Id" : 9001,\r\n\t"Type":11 ,  "CreatedOn":"2026-11-28T11:59:59.9Z"\n}',
        '{"Id":9001,"Type":11,"CreatedOn":"2026-11-28T11:59:59Z","Message":"ć € 💶"}'.encode(),
        rb'{"Id":9001,"Type":11,"CreatedOn":"2026-11-28T11:59:59Z","Message":"\u0107 \"q\" \\ \/"}',
        b'{"CreatedOn":"2026-11-28T11:59:59.9Z","Type":11,"Id":9001,"Extra":{"a":[1,2.50,true]}}',
    ],
    ids=["compact", "whitespace", "utf-8", "escapes", "key order and extras"],
)
def test_signature_covers_the_exact_activity_bytes(raw: bytes) -> None:
    parsed = parse(webhook(raw))

    assert parsed.data == json.loads(raw)
    reserialized = json.dumps(json.loads(raw)).encode()  # same JSON, other bytes
    assert reserialized != raw
    with pytest.raises(BadSignature, match=r"^Signature: does not match$"):
        parse(webhook(raw, signature=sign(reserialized)))


def test_whitespace_around_the_activity_value_is_not_signed() -> None:
    raw = json.dumps(activity()).encode()
    body = (
        b' \n{ "Signature" : "' + sign(raw).encode() + b'" ,\t"Timestamp":"' + TIMESTAMP.encode()
        + b'" , "Activity" :\n  ' + raw + b"  \r\n}\n "
    )  # fmt: skip

    assert parse(body).data == activity()


@pytest.mark.parametrize(
    ("template", "algorithm"),
    [
        ("{Timestamp}.{Activity}", "hmac-sha256"),
        ("{Timestamp}.{Activity}", "sha256"),
        ("{Activity}", "hmac-sha256"),
        ("{Activity}|{Timestamp}", "sha256"),
        ("v1:{Timestamp}:{Activity}:{Timestamp}", "hmac-sha256"),
    ],
)
def test_signature_recipe_from_config(template: str, algorithm: str) -> None:
    source = make_source(signature_template=template, signature_algorithm=algorithm)
    assert parse(webhook(template=template, algorithm=algorithm), source).id == "9001"
    other = "sha256" if algorithm == "hmac-sha256" else "hmac-sha256"
    with pytest.raises(BadSignature):
        parse(webhook(template=template, algorithm=other), source)


def test_signature_under_any_configured_secret_is_accepted() -> None:
    assert parse(webhook(secret="old-secret")).id == "9001"
    assert parse(webhook(secret="new-secret")).id == "9001"
    with pytest.raises(BadSignature, match=r"^Signature: does not match$"):
        parse(webhook(secret="other-secret"))


def test_signature_hex_is_case_insensitive() -> None:
    assert parse(webhook(signature=sign(json.dumps(activity()).encode()).upper())).id == "9001"


def good_signature() -> str:
    return sign(json.dumps(activity()).encode())


@pytest.mark.parametrize(
    "signature",
    [
        "0" + good_signature()[1:],
        good_signature()[:-1] + ("0" if good_signature()[-1] != "0" else "1"),
        good_signature()[:-1],
        good_signature() + "0",
        good_signature()[:-1] + "g",
        " " + good_signature()[1:],
        "sha256=" + good_signature(),
    ],
    ids=["first char", "last char", "short", "long", "not hex", "space", "prefixed"],
)
def test_near_miss_signatures_are_rejected(signature: str) -> None:
    with pytest.raises(BadSignature, match=r"^Signature: does not match$"):
        parse(webhook(signature=signature))


def test_tampered_activity_is_rejected() -> None:
    raw = json.dumps(activity()).encode()
    body = webhook(raw).replace(b'"InvoiceId": 42', b'"InvoiceId": 43')

    with pytest.raises(BadSignature, match=r"^Signature: does not match$"):
        parse(body)


def test_signed_timestamp_cannot_be_swapped() -> None:
    raw = json.dumps(activity()).encode()

    with pytest.raises(BadSignature, match=r"^Signature: does not match$"):
        parse(webhook(raw, timestamp="2026-11-28T12:00:01Z", signature=sign(raw)))


@pytest.mark.parametrize(
    "head",
    [
        b'{"Timestamp": "' + TIMESTAMP.encode() + b'", ',
        b'{"Signature": "", "Timestamp": "' + TIMESTAMP.encode() + b'", ',
        b'{"Signature": null, "Timestamp": "' + TIMESTAMP.encode() + b'", ',
        b'{"Signature": 12, "Timestamp": "' + TIMESTAMP.encode() + b'", ',
    ],
    ids=["absent", "empty", "null", "number"],
)
def test_missing_signature(head: bytes) -> None:
    body = head + b'"Activity": ' + json.dumps(activity()).encode() + b"}"

    with pytest.raises(BadSignature, match=r"^Signature: missing$"):
        parse(body)


# --- the timestamp ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [(0.0, True), (300.0, True), (-300.0, True), (300.001, False), (-300.001, False)],
)
def test_tolerance_boundaries(offset: float, accepted: bool) -> None:
    sent = datetime.fromisoformat("2026-11-28T12:00:00+00:00").timestamp()
    body = webhook(timestamp="2026-11-28T12:00:00Z")
    source = make_source(tolerance_seconds=300)

    if accepted:
        assert parse(body, source, now=sent + offset).id == "9001"
    else:
        with pytest.raises(BadSignature, match=r"^Timestamp: outside the tolerance of 300s$"):
            parse(body, source, now=sent + offset)


@pytest.mark.parametrize("offset", [-86_400.0, 86_400.0])
def test_an_envoice_source_checks_no_timestamp_by_default(offset: float) -> None:
    sent = datetime.fromisoformat("2026-11-28T12:00:00+00:00").timestamp()

    event = parse(webhook(timestamp="2026-11-28T12:00:00Z"), now=sent - offset)

    assert SOURCE.tolerance_seconds == 0
    assert event.id == "9001"


def test_tolerance_zero_turns_the_check_off() -> None:
    source = make_source(tolerance_seconds=0)

    assert parse(webhook(), source, now=NOW + 10 * 365 * 86400).id == "9001"


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-11-28T12:00:00Z",
        "2026-11-28T12:00:00.1Z",
        "2026-11-28T12:00:00.1234567Z",
        "2026-11-28T12:00:00",
        "2026-11-28T14:00:00+02:00",
        "2026-11-28T07:00:00.5-05:00",
    ],
)
def test_timestamp_formats(timestamp: str) -> None:
    source = make_source(tolerance_seconds=1)
    noon = datetime.fromisoformat("2026-11-28T12:00:00+00:00").timestamp()

    assert parse(webhook(timestamp=timestamp), source, now=noon).id == "9001"


@pytest.mark.parametrize(
    "timestamp",
    [
        "yesterday",
        "2026-11-28 12:00:00Z",
        "2026-11-28T12:00:00.12345678Z",
        "2026-11-28T12:00Z",
        "2026-13-01T12:00:00Z",
        "2026-02-30T12:00:00Z",
        "2026-11-28T25:00:00Z",
        "2026-11-28T12:00:00+99:00",
    ],
)
def test_bad_timestamp_is_a_bad_payload(timestamp: str) -> None:
    with pytest.raises(BadPayload, match=r"^Timestamp: "):
        parse(webhook(timestamp=timestamp))


# --- the payload ------------------------------------------------------------------------------

VALID = webhook()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "body must be a JSON object"),
        (b"[]", "body must be a JSON object"),
        (b'"Activity"', "body must be a JSON object"),
        (b"\xff\xfe{}", "body is not valid UTF-8"),
        (VALID.replace(b"Invoice paid", b"Invoice p\xe4id"), "body is not valid UTF-8"),
        (b"{", "body is not valid JSON"),
        (VALID[:-1], "body is not valid JSON"),
        (VALID + b" x", "body is not valid JSON"),
        (VALID + b"{}", "body is not valid JSON"),
        (VALID[:-1] + b",}", "body is not valid JSON"),
        (b'{,"Timestamp": "x"}', "body is not valid JSON"),
        (b'{"Timestamp" "x"}', "body is not valid JSON"),
        (b"{Timestamp: 1}", "body is not valid JSON"),
        (VALID.replace(b'"Id": 9001', b'"Id": 9001, "Extra": NaN'), "body is not valid JSON"),
        (VALID.replace(b'"Id": 9001', b'"Id": 9001, "Extra": Infinity'), "body is not valid JSON"),
        (b'{"Activity": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body is not valid JSON"),
    ],
    ids=[
        "empty", "array", "string", "not utf-8", "latin-1 inside", "open brace", "unclosed",
        "trailing garbage", "two objects", "trailing comma", "leading comma", "no colon",
        "unquoted key", "NaN", "Infinity", "deep nesting",
    ],
)  # fmt: skip
def test_not_a_json_object(body: bytes, message: str) -> None:
    with pytest.raises(BadPayload, match=f"^{message}"):
        parse(body)


@pytest.mark.parametrize(
    ("key", "decoy"),
    [
        ("Activity", json.dumps(activity(Id=1, InvoiceId=1)).encode()),
        ("Timestamp", b'"1999-01-01T00:00:00Z"'),
        ("Signature", b'"' + b"0" * 64 + b'"'),
    ],
    ids=["Activity", "Timestamp", "Signature"],
)
def test_duplicate_top_level_keys_are_rejected(key: str, decoy: bytes) -> None:
    # Given a valid body with a decoy value for one key placed before the real one
    body = b'{"' + key.encode() + b'": ' + decoy + b", " + VALID[1:]
    # Then it is refused: a parser taking the first value would read another webhook
    with pytest.raises(BadPayload):
        parse(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"Signature": "x", "Timestamp": "' + TIMESTAMP.encode() + b'"}', "Activity: "),
        (VALID.replace(b'"Activity": {', b'"Activity": [{').replace(b"}}", b"}]}"), "Activity: "),
        (VALID.split(b', "Activity"')[0] + b', "Activity": "{}"}', "Activity: "),
        (VALID.replace(b'"Activity": {', b'"Activity": null, "X": {'), "Activity: "),
        (VALID.replace(b'"Timestamp"', b'"TimeStamp"'), "Timestamp: "),
        (VALID.replace(b'"' + TIMESTAMP.encode() + b'"', b"1764331200"), "Timestamp: "),
    ],
    ids=["no Activity", "Activity array", "Activity string", "Activity null", "no Timestamp",
         "Timestamp number"],
)  # fmt: skip
def test_missing_envelope_field(body: bytes, message: str) -> None:
    with pytest.raises(BadPayload, match=f"^{message}"):
        parse(body)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"Id": ...}, "Activity.Id"),
        ({"Id": "9001"}, "Activity.Id"),
        ({"Id": 9001.0}, "Activity.Id"),
        ({"Id": True}, "Activity.Id"),
        ({"Id": None}, "Activity.Id"),
        ({"Id": -1}, "Activity.Id"),
        ({"Type": ...}, "Activity.Type"),
        ({"Type": None}, "Activity.Type"),
        ({"Type": False}, "Activity.Type"),
        ({"Type": 11.0}, "Activity.Type"),
        ({"Type": -1}, "Activity.Type"),
        ({"Type": "Payed"}, "Activity.Type"),
        ({"Type": ""}, "Activity.Type"),
        ({"CreatedOn": ...}, "Activity.CreatedOn"),
        ({"CreatedOn": 1764331200}, "Activity.CreatedOn"),
        ({"CreatedOn": "yesterday"}, "Activity.CreatedOn"),
        ({"CreatedOn": "2026-02-30T12:00:00Z"}, "Activity.CreatedOn"),
        ({"InvoiceId": "42"}, "Activity.InvoiceId"),
        ({"InvoiceId": True}, "Activity.InvoiceId"),
        ({"OrderId": 1.5}, "Activity.OrderId"),
        ({"Message": 5}, "Activity.Message"),
        ({"Link": ["x"]}, "Activity.Link"),
        ({"InvoiceNumber": 7}, "Activity.InvoiceNumber"),
        ({"OrderNumber": {}}, "Activity.OrderNumber"),
    ],
)
def test_bad_activity_field_is_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(BadPayload, match=f"^{field}: "):
        parse(webhook(activity(**fields)))


def test_payload_is_only_validated_after_the_signature() -> None:
    raw = json.dumps(activity(Id="not a number")).encode()

    with pytest.raises(BadSignature):
        parse(webhook(raw, signature=sign(raw, secret="other")))


# --- samples ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe",
    [
        {},
        {"signature_algorithm": "sha256", "signature_template": "{Activity}/{Timestamp}"},
    ],
)
def test_sample_round_trips_through_parse(recipe: dict[str, str]) -> None:
    source = make_source(**recipe)

    parsed = parse(envoice.sample(source, event_id=77, key=5, now=NOW), source)

    assert (parsed.id, parsed.key, parsed.source) == ("77", "invoice:5", "envoice")
    assert parsed.name == envoice.event_name(source, parsed.type)
    assert parsed.data["InvoiceNumber"] == "INV-5"
    assert parsed.occurred_at.startswith("2026-11-28T12:00:00.123456")


def test_sample_is_signed_with_the_first_secret() -> None:
    body = envoice.sample(SOURCE, event_id=1, key=1, now=NOW)

    parse(body, make_source(secrets=["old-secret"]))
    with pytest.raises(BadSignature):
        parse(body, make_source(secrets=["new-secret"]))
