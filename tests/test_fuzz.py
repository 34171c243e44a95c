"""Property-based tests: whatever a client sends to a source's path or the operational GETs, the
ingress answers from the table of docs/COMMANDS.md (per request: a GET is never answered 400) and
logs nothing at error level; whatever an Envoice field holds, the parser either refuses it with
a 4xx error or produces a message every JSON reader downstream can read."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.config import from_dict as config_from_dict
from relay.errors import BadPayload, BadSignature
from relay.ingress import create_app, runner_options
from relay.providers import Request
from relay.providers.envoice import parse
from relay.wire import envelope
from tests.conftest import settings_dict
from tests.support import FakePublisher, activity, now_timestamp, signed_body

PATH = "/webhooks/envoice"
# docs/COMMANDS.md "Ingress answers": what a webhook POSTed to a source's path may be answered
# (not 503: the fake publisher confirms everything), and what the operational GETs answer (417 to an
# `Expect` other than 100-continue, as any request; a GET's body is never read). The table names
# no other request (another path or method), so none is sent: its answer would be aiohttp's 404
# or 405, which the table does not promise.
WEBHOOK_ANSWERS = {200, 400, 401, 408, 413, 415, 417}
OPERATIONAL_ANSWERS = {"/healthz": {200, 417}, "/readyz": {200, 417, 503}, "/metrics": {200, 417}}
ANSWERS = {("POST", PATH): WEBHOOK_ANSWERS} | {
    ("GET", path): answers for path, answers in OPERATIONAL_ANSWERS.items()
}
SETTINGS = config_from_dict(settings_dict("fuzz", ingress={"max_body_bytes": 4096}))
SOURCE = SETTINGS.sources[0]
EXAMPLES = settings(
    max_examples=300, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip

# Strings as JSON can carry them: lone surrogates included (json.dumps escapes them).
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
FIELDS = ("Id", "Type", "CreatedOn", "InvoiceId", "OrderId", "Message", "Link", "InvoiceNumber")


def encode(value: Any) -> bytes:
    """JSON as a careless provider might write it: NaN and Infinity are possible."""
    return json.dumps(value).encode()


@st.composite
def envoice_bodies(draw: st.DrawFn) -> bytes:
    """Envoice-shaped bodies with arbitrary values in some fields; most are signed correctly."""
    act: dict[str, Any] = activity(Id=draw(st.integers(0, 2**70)))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        act[name] = draw(json_values)
    if draw(st.booleans()):
        act["Extra"] = draw(json_values)
    forged = draw(st.sampled_from([None, None, None, "0" * 64, "not hex"]))
    return signed_body(SOURCE, encode(act), timestamp=now_timestamp(), signature=forged)


bodies = st.one_of(
    st.binary(max_size=600),
    json_values.map(encode),
    envoice_bodies(),
    st.binary(min_size=4090, max_size=4200),  # around max_body_bytes
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
request_headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(["application/json", "text/plain", "x/y"]) | header_values,
        "Content-Encoding": st.sampled_from(["identity", "gzip", "br", "deflate", ""])
        | header_values,
        "Expect": st.sampled_from(["100-continue", "nonsense"]),
        "X-Anything": header_values,
    },
)


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_any_request_is_answered_from_the_table_and_never_logged_as_an_error() -> None:
    loop = asyncio.new_event_loop()
    publisher = FakePublisher()
    server = TestServer(create_app(SETTINGS, publisher), host="127.0.0.1")
    loop.run_until_complete(server.start_server(**runner_options(SETTINGS.ingress)))

    async def connect() -> ClientSession:
        return ClientSession(base_url=str(server.make_url("")))

    client = loop.run_until_complete(connect())
    stdlib_errors = ErrorRecords()
    logging.getLogger().addHandler(stdlib_errors)
    seen: set[int] = set()

    @EXAMPLES
    # Each kind of answer the final assertion needs, whatever the random draws reach:
    @example(("POST", PATH), signed_body(SOURCE, encode(activity())), {})  # 200
    @example(("POST", PATH), signed_body(SOURCE, b"[1]"), {})  # 400
    @example(("POST", PATH), signed_body(SOURCE, encode(activity()), signature="0" * 64), {})  # 401
    @given(
        request=st.sampled_from([("POST", PATH)] * 6 + [("GET", p) for p in OPERATIONAL_ANSWERS]),
        body=bodies,
        headers=request_headers,
    )
    def check(request: tuple[str, str], body: bytes, headers: dict[str, str]) -> None:
        method, path = request

        async def send() -> int:
            async with client.request(method, path, data=body, headers=headers) as response:
                await response.read()
                return response.status

        with structlog.testing.capture_logs() as logs:
            status = loop.run_until_complete(send())
        seen.add(status)
        assert status in ANSWERS[method, path], (method, path, status, logs)
        assert not [line for line in logs if line["log_level"] in ("error", "critical")]
        assert not stdlib_errors.records

    try:
        check()
    finally:
        logging.getLogger().removeHandler(stdlib_errors)
        loop.run_until_complete(client.close())
        loop.run_until_complete(server.close())
        loop.close()
    assert {200, 400, 401} <= seen  # the strategies reach past the first checks


@EXAMPLES
@given(body=envoice_bodies())
def test_a_parsed_envoice_webhook_can_be_read_by_every_consumer(body: bytes) -> None:
    try:
        event = parse(Request(body, {}), SOURCE, time.time())
    except (BadPayload, BadSignature):
        return
    message = envelope(event, datetime.now(UTC))

    read_by_orjson = orjson.loads(message)
    read_by_json = json.loads(message)
    assert read_by_orjson["data"] == orjson.loads(event.data_json) == event.data
    assert read_by_json["id"] == event.message_id
    assert isinstance(event.type, int)
    assert 0 <= event.type < 2**64
