"""The ingress over real HTTP: every row of docs/COMMANDS.md, "Ingress answers". The answers that do
not depend on the broker run against a fake publisher (no RabbitMQ); publishing, duplicates and 503s
against the real broker (marked `rabbit`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client.parser import text_string_to_metric_families

from relay import topology
from relay.broker import exchange_exists
from relay.config import from_dict as config_from_dict
from relay.ingress import SETTINGS
from relay.secrets import Secret
from relay.settings import Settings, SourceSettings
from tests.conftest import AMQP_URL, SECRET, MakeSettings, settings_dict
from tests.support import (
    FakePublisher,
    Ingress,
    TcpProxy,
    activity,
    declare_topology,
    envoice_signature,
    eventually,
    now_timestamp,
    running_ingress,
    signed_body,
)

PATH = "/webhooks/envoice"
# Every event goes to this handler's partitions, so nothing lands in the shared relay.unrouted.
BILLING = {
    "name": "billing",
    "events": ["envoice.#"],
    "url": "http://127.0.0.1:9/",
    "partitions": 2,
}


# --- helpers -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def offline(**sections: dict[str, Any]) -> AsyncIterator[tuple[Ingress, FakePublisher]]:
    """The ingress on a fake publisher: every publish confirmed at once, kept for the test."""
    source = {"tolerance_seconds": 300, **sections.pop("source", {})}
    settings = config_from_dict(
        settings_dict("offline", handlers=[], url=AMQP_URL, source=source, **sections)
    )
    publisher = FakePublisher()
    async with running_ingress(settings, publisher=publisher) as ingress:
        yield ingress, publisher


def body_with(raw_activity: bytes, signature: str | None, timestamp: str) -> bytes:
    head = {"Timestamp": timestamp}
    if signature is not None:
        head = {"Signature": signature, **head}
    return orjson.dumps(head)[:-1] + b',"Activity":' + raw_activity + b"}"


async def depth(channel: AbstractChannel, settings: Settings) -> int:
    """Messages waiting in all of the (only) handler's partition queues."""
    total = 0
    for name in settings.handlers[0].queues:
        queue = await channel.declare_queue(name, passive=True)
        assert queue.declaration_result.message_count is not None
        total += queue.declaration_result.message_count
    return total


async def wait_for_depth(channel: AbstractChannel, settings: Settings, expected: int) -> None:
    async def reached() -> bool:
        return await depth(channel, settings) >= expected

    await eventually(reached, what=f"{expected} message(s) in the partitions")
    assert await depth(channel, settings) == expected


async def get(ingress: Ingress, path: str) -> tuple[int, str, dict[str, str]]:
    async with ingress.client.get(path) as response:
        return response.status, await response.text(), dict(response.headers)


async def accepted_once_broker_is_back(ingress: Ingress, body: bytes) -> None:
    """Retry like a provider while answers are 503; the first other answer must be `accepted`."""

    async def not_503() -> tuple[int, dict[str, Any]] | None:
        status, answer, _ = await ingress.post(PATH, body)
        return None if status == 503 else (status, answer)

    status, answer = await eventually(not_503, what="an answer other than 503")
    assert (status, answer["status"]) == (200, "accepted"), answer


@pytest.fixture
def settings(make_settings: MakeSettings) -> Settings:
    return make_settings(handlers=[BILLING], source={"tolerance_seconds": 300})


@pytest.fixture
def source(settings: Settings) -> SourceSettings:
    return settings.sources[0]


# --- 200 accepted / duplicate --------------------------------------------------------------


@pytest.mark.rabbit
async def test_valid_webhook_is_accepted_and_on_the_broker(
    settings: Settings, source: SourceSettings, channel: AbstractChannel
) -> None:
    act = activity()
    async with running_ingress(settings) as ingress:
        status, answer, _ = await ingress.post(PATH, signed_body(source, act))

    assert status == 200
    assert answer == {"status": "accepted", "id": f"envoice:{act['Id']}"}
    await wait_for_depth(channel, settings, 1)


@pytest.mark.rabbit
async def test_repeated_event_id_is_a_duplicate_and_not_published_again(
    settings: Settings, source: SourceSettings, channel: AbstractChannel
) -> None:
    # Given an accepted event
    act = activity()
    async with running_ingress(settings) as ingress:
        status, first, _ = await ingress.post(PATH, signed_body(source, act))
        assert (status, first["status"]) == (200, "accepted")

        # When Envoice sends it again, re-signed with a later Timestamp
        status, again, _ = await ingress.post(
            PATH, signed_body(source, act, timestamp=now_timestamp(1))
        )

        # Then it is a duplicate, and a later event proves nothing else was published
        assert (status, again) == (200, {"status": "duplicate", "id": f"envoice:{act['Id']}"})
        status, _, _ = await ingress.post(PATH, signed_body(source, activity(Id=act["Id"] + 1)))
        assert status == 200
    await wait_for_depth(channel, settings, 2)


@pytest.mark.rabbit
async def test_concurrent_posts_of_one_event_publish_it_once(
    settings: Settings, source: SourceSettings, channel: AbstractChannel
) -> None:
    act = activity()
    bodies = [signed_body(source, act, timestamp=now_timestamp(-i)) for i in range(5)]
    async with running_ingress(settings) as ingress:
        answers = await asyncio.gather(*(ingress.post(PATH, body) for body in bodies))

    assert [status for status, _, _ in answers] == [200] * 5
    assert sorted(answer["status"] for _, answer, _ in answers) == ["accepted"] + ["duplicate"] * 4
    await wait_for_depth(channel, settings, 1)


# --- 400 -----------------------------------------------------------------------------------

Body = Callable[[SourceSettings], bytes]
DEEP = b"[" * 99_999 + b"]" * 99_999  # valid JSON, but past any recursive parser's depth


def signed(**fields: Any) -> Body:
    return lambda source: signed_body(source, activity(**fields))


def signed_without(field: str) -> Body:
    def body(source: SourceSettings) -> bytes:
        act = activity()
        del act[field]
        return signed_body(source, act)

    return body


@pytest.mark.parametrize(
    ("body", "named"),
    [
        pytest.param(lambda s: b'{"Signature": "ab", "Timestamp"', "JSON", id="not-json"),
        pytest.param(lambda s: b"\xff\xfe{}", "UTF-8", id="not-utf8"),
        pytest.param(lambda s: b'[{"Activity": {}}]', "object", id="a-list"),
        pytest.param(lambda s: b'"Activity"', "object", id="a-string"),
        pytest.param(
            lambda s: orjson.dumps({"Signature": "0" * 64, "Timestamp": now_timestamp()}),
            "Activity",
            id="activity-missing",
        ),
        pytest.param(lambda s: signed_body(s, b"[1, 2]"), "Activity", id="activity-a-list"),
        pytest.param(lambda s: signed_body(s, b"null"), "Activity", id="activity-null"),
        pytest.param(signed_without("Id"), "Activity.Id", id="id-missing"),
        pytest.param(signed_without("Type"), "Activity.Type", id="type-missing"),
        pytest.param(signed_without("CreatedOn"), "Activity.CreatedOn", id="created-missing"),
        pytest.param(signed(InvoiceId="x"), "Activity.InvoiceId", id="invoice-id-a-string"),
        pytest.param(signed(Id=True), "Activity.Id", id="id-a-bool"),
        pytest.param(signed(Id="9001"), "Activity.Id", id="id-a-string"),
        pytest.param(signed(Message=5), "Activity.Message", id="message-a-number"),
        pytest.param(signed(Type=1.5), "Activity.Type", id="type-a-float"),
        pytest.param(signed(Type="NoSuchType"), "Activity.Type", id="type-unknown-name"),
        pytest.param(signed(CreatedOn="28/11/2026 12:00"), "Activity.CreatedOn", id="bad-date"),
        pytest.param(signed(CreatedOn="2026-02-30T12:00:00Z"), "Activity.CreatedOn", id="feb-30"),
        pytest.param(lambda s: signed_body(s, DEEP), "not valid JSON", id="deeply-nested-activity"),
    ],
)
async def test_malformed_payload_is_400_naming_the_problem(body: Body, named: str) -> None:
    async with offline() as (ingress, publisher):
        source = ingress.app[SETTINGS].sources[0]
        status, answer, headers = await ingress.post(PATH, body(source))

    assert status == 400, answer
    assert headers["Content-Type"].startswith("application/json")
    assert named in answer["error"]
    assert not publisher.published


async def test_an_impossible_timestamp_is_400_naming_it() -> None:
    async with offline() as (ingress, publisher):
        source = ingress.app[SETTINGS].sources[0]
        body = signed_body(source, activity(), timestamp="2026-11-28T25:00:00Z")
        status, answer, _ = await ingress.post(PATH, body)

    assert status == 400, answer
    assert answer["error"].startswith("Timestamp: expected an ISO 8601 timestamp")
    assert not publisher.published


# --- 401 -----------------------------------------------------------------------------------


def tampered(source: SourceSettings) -> bytes:
    timestamp = now_timestamp()
    signature = envoice_signature(SECRET, timestamp, orjson.dumps(activity(InvoiceId=42)))
    return body_with(orjson.dumps(activity(InvoiceId=43)), signature, timestamp)


def timestamp_swapped(source: SourceSettings) -> bytes:
    raw = orjson.dumps(activity())
    signature = envoice_signature(SECRET, now_timestamp(-1), raw)
    return body_with(raw, signature, now_timestamp())


def with_signature(signature: str) -> Body:
    return lambda source: signed_body(source, activity(), signature=signature)


def sent_at(offset_seconds: float) -> Body:
    return lambda source: signed_body(source, activity(), timestamp=now_timestamp(offset_seconds))


def by_secret(secret: str) -> Body:
    return lambda source: signed_body(replace(source, secrets=(Secret(secret),)), activity())


def unsigned(source: SourceSettings) -> bytes:
    return body_with(orjson.dumps(activity()), None, now_timestamp())


@pytest.mark.parametrize(
    ("body", "named"),
    [
        pytest.param(with_signature("0" * 64), "Signature", id="wrong-signature"),
        pytest.param(with_signature("not hex"), "Signature", id="not-hex"),
        pytest.param(with_signature(""), "Signature", id="empty-signature"),
        pytest.param(unsigned, "Signature", id="missing-signature"),
        pytest.param(tampered, "Signature", id="activity-changed-after-signing"),
        pytest.param(timestamp_swapped, "Signature", id="timestamp-changed-after-signing"),
        pytest.param(by_secret("other-secret"), "Signature", id="unknown-secret"),
        pytest.param(sent_at(-400), "Timestamp", id="timestamp-too-old"),
        pytest.param(sent_at(400), "Timestamp", id="timestamp-in-the-future"),
    ],
)
async def test_bad_signature_or_stale_timestamp_is_401(body: Body, named: str) -> None:
    async with offline() as (ingress, publisher):
        source = ingress.app[SETTINGS].sources[0]
        async with ingress.client.post(PATH, data=body(source)) as response:
            status, text = response.status, await response.text()

    assert status == 401, text
    assert named in json.loads(text)["error"]
    assert SECRET not in text
    assert not publisher.published


async def test_timestamp_check_is_off_when_tolerance_is_zero() -> None:
    async with offline(source={"tolerance_seconds": 0}) as (ingress, publisher):
        source = ingress.app[SETTINGS].sources[0]
        old = signed_body(source, activity(), timestamp="2019-01-01T00:00:00Z")
        status, answer, _ = await ingress.post(PATH, old)

    assert (status, answer["status"]) == (200, "accepted"), answer
    assert len(publisher.published) == 1


@pytest.mark.parametrize(
    ("config", "accepted", "refused"),
    [
        pytest.param(
            {"secrets": ["old-secret", "new-secret"]},
            [{"secret": "old-secret"}, {"secret": "new-secret"}],
            {"secret": "some-other-secret"},
            id="rotated-secrets",
        ),
        pytest.param(
            {"signature_algorithm": "sha256"},
            [{"algorithm": "sha256"}],
            {"algorithm": "hmac-sha256"},
            id="sha256",
        ),
        pytest.param(
            {"signature_template": "v1:{Activity}:{Timestamp}"},
            [{"template": "v1:{Activity}:{Timestamp}"}],
            {"template": "{Timestamp}.{Activity}"},
            id="custom-template",
        ),
        pytest.param({}, [{"upper": True}, {}], {"template": "{Activity}"}, id="uppercase-hex"),
    ],
)
async def test_signature_recipe_follows_the_source_config(
    config: dict[str, Any], accepted: list[dict[str, Any]], refused: dict[str, Any]
) -> None:
    def body(secret: str = SECRET, upper: bool = False, **recipe: str) -> bytes:
        raw, timestamp = orjson.dumps(activity()), now_timestamp()
        signature = envoice_signature(secret, timestamp, raw, **recipe)
        return body_with(raw, signature.upper() if upper else signature, timestamp)

    async with offline(source=config) as (ingress, publisher):
        for recipe in accepted:
            status, answer, _ = await ingress.post(PATH, body(**recipe))
            assert (status, answer.get("status")) == (200, "accepted"), (recipe, answer)
        status, answer, _ = await ingress.post(PATH, body(**refused))
        assert status == 401, (refused, answer)
    assert len(publisher.published) == len(accepted)


async def test_signature_covers_the_exact_activity_bytes() -> None:
    # Given an Activity with odd whitespace, key order, a \u escape and raw UTF-8,
    # in a body whose keys are in an unusual order too
    raw = (
        b'{ "CreatedOn" :"2026-11-28T11:59:59.9Z",\n\t"Id": %d ,  "Type":11,'
        b' "Message": "Zahlung \\u00e9rhalten \xe2\x82\xac 5" , "InvoiceId" : 42 }'
    ) % time.time_ns()
    timestamp = now_timestamp()

    def body(signed_over: bytes) -> bytes:
        signature = envoice_signature(SECRET, timestamp, signed_over)
        return b'{\n  "Timestamp" : "%s",\r\n  "Activity" :  %s ,\n  "Signature":"%s"\n}\n' % (
            timestamp.encode(),
            raw,
            signature.encode(),
        )

    async with offline() as (ingress, publisher):
        # When it is signed over the same Activity re-serialized, it is refused
        reserialized = orjson.dumps(json.loads(raw))
        status, answer, _ = await ingress.post(PATH, body(reserialized))
        assert status == 401, answer
        # Then signed over the raw bytes as they appear in the body, it is accepted, and those
        # bytes are what is forwarded
        status, answer, _ = await ingress.post(PATH, body(raw))
        assert (status, answer.get("status")) == (200, "accepted"), answer
    [event] = publisher.published
    assert event.data_json == raw


# --- 413 -----------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413() -> None:
    async with offline(ingress={"max_body_bytes": 1024}) as (ingress, publisher):
        source = ingress.app[SETTINGS].sources[0]
        small, large = activity(Message="x" * 100), activity(Message="x" * 1000)
        assert len(signed_body(source, small)) < 1024 < len(signed_body(source, large))

        status, answer, headers = await ingress.post(PATH, signed_body(source, large))
        assert status == 413
        assert headers["Content-Type"].startswith("application/json")
        assert "1024" in answer["error"]
        status, answer, _ = await ingress.post(PATH, signed_body(source, small))
        assert (status, answer["status"]) == (200, "accepted")
    assert len(publisher.published) == 1


# --- 503 -----------------------------------------------------------------------------------


@pytest.mark.rabbit
async def test_ingress_serves_503_while_the_broker_is_unreachable(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(handlers=[BILLING], url="amqp://guest:guest@127.0.0.1:1/")
    async with running_ingress(settings, ready=False) as ingress:
        body = signed_body(settings.sources[0], activity())
        status, answer, headers = await ingress.post(PATH, body)
        ready_status, ready_text, _ = await get(ingress, "/readyz")
        health_status, _, _ = await get(ingress, "/healthz")

    assert status == 503
    assert int(headers["Retry-After"]) > 0
    assert answer["error"]
    assert ready_status == 503
    assert json.loads(ready_text)["error"]
    assert health_status == 200


@pytest.mark.rabbit
async def test_ingress_answers_503_when_the_broker_goes_and_recovers_by_itself(
    make_settings: MakeSettings, proxy: TcpProxy, channel: AbstractChannel
) -> None:
    settings = make_settings(handlers=[BILLING], url=proxy.url())
    source = settings.sources[0]
    async with running_ingress(settings) as ingress:
        # Given a connected ingress
        assert (await get(ingress, "/readyz"))[0] == 200

        # When the broker disappears
        await proxy.cut()

        # Then it is not ready and asks providers to retry later
        await eventually(lambda: _status(ingress, "/readyz", 503), what="/readyz 503")
        body = signed_body(source, activity())
        status, answer, headers = await ingress.post(PATH, body)
        assert status == 503, answer
        assert int(headers["Retry-After"]) > 0

        # When the broker is back on the same address
        back = TcpProxy()
        back.port = proxy.port
        await back.start()
        try:
            # Then the ingress reconnects by itself and accepts the refused webhook
            await eventually(lambda: _status(ingress, "/readyz", 200), what="/readyz 200")
            await accepted_once_broker_is_back(ingress, body)
        finally:
            await back.cut()
    await wait_for_depth(channel, settings, 1)


async def _status(ingress: Ingress, path: str, expected: int) -> bool:
    return (await get(ingress, path))[0] == expected


@pytest.mark.rabbit
async def test_no_confirm_within_the_publish_timeout_is_503(
    make_settings: MakeSettings, proxy: TcpProxy
) -> None:
    settings = make_settings(
        handlers=[BILLING], url=proxy.url(), broker={"publish_timeout_seconds": 0.5}
    )
    async with running_ingress(settings) as ingress:
        # Given a broker whose answers (confirms included) no longer arrive
        proxy.stalled.set()

        started = time.monotonic()
        body = signed_body(settings.sources[0], activity())
        status, answer, headers = await ingress.post(PATH, body)
        elapsed = time.monotonic() - started

        await proxy.cut()  # else closing the stalled connection waits for its timeout
    assert status == 503, answer
    assert int(headers["Retry-After"]) > 0
    assert 0.5 <= elapsed < 3


@pytest.mark.rabbit
async def test_publish_returned_unroutable_is_503_and_not_remembered(
    make_settings: MakeSettings, channel: AbstractChannel
) -> None:
    # The archive off: bound to the exchange for every routing key, it would take the message
    # (nothing comes back: the webhook is accepted, kept only in the archive)
    settings = make_settings(
        handlers=[BILLING], source={"tolerance_seconds": 300}, archive={"enabled": False}
    )
    source = settings.sources[0]
    async with running_ingress(settings) as ingress:
        # Given the handler's binding still matches but its partition queues are gone
        for name in settings.handlers[0].queues:
            await channel.queue_delete(name)

        # When a webhook comes: the broker returns the message
        body = signed_body(source, activity())
        status, answer, headers = await ingress.post(PATH, body)

        # Then it is refused for a retry, not accepted into nowhere
        assert status == 503, answer
        assert int(headers["Retry-After"]) > 0

        # And once the queues are back, the retry is accepted, not a "duplicate"
        await topology.declare(channel, topology.describe(settings))
        status, answer, _ = await ingress.post(PATH, body)
        assert (status, answer["status"]) == (200, "accepted")
    await wait_for_depth(channel, settings, 1)


@pytest.mark.rabbit
async def test_publish_to_a_missing_exchange_is_503_and_not_remembered(
    settings: Settings, source: SourceSettings, channel: AbstractChannel
) -> None:
    async with running_ingress(settings) as ingress:
        # Given the exchange is deleted under a connected ingress
        await channel.exchange_delete(settings.broker.exchange)

        # When a webhook comes
        body = signed_body(source, activity())
        status, answer, headers = await ingress.post(PATH, body)

        # Then it is refused for a retry
        assert status == 503, answer
        assert int(headers["Retry-After"]) > 0

        # And the ingress declares the exchange again by itself; once the operator declared the
        # handlers' bindings again too (they went with the exchange), the retry is accepted
        async def exchange_back() -> bool:
            return await exchange_exists(ingress_connection, settings.broker.exchange)

        async with await aio_pika.connect(AMQP_URL) as ingress_connection:
            await eventually(exchange_back, what="the ingress declared its exchange again")
        await declare_topology(settings)
        await accepted_once_broker_is_back(ingress, body)
    await wait_for_depth(channel, settings, 1)


# --- 404 / 405 and the operational endpoints -----------------------------------------------


async def test_unknown_path_is_404_and_wrong_method_is_405_in_json() -> None:
    async with offline() as (ingress, _):
        status, answer, headers = await ingress.post("/webhooks/nope", b"{}")
        assert status == 404
        assert answer["error"]
        assert headers["Content-Type"].startswith("application/json")

        status, text, headers = await get(ingress, PATH)
        assert status == 405
        assert json.loads(text)["error"]
        assert headers["Content-Type"].startswith("application/json")
        assert headers.get("Allow") == "POST"  # RFC 9110: a 405 names the allowed methods


@pytest.mark.rabbit
async def test_healthz_and_readyz_are_200_when_connected(settings: Settings) -> None:
    async with running_ingress(settings) as ingress:
        assert (await get(ingress, "/healthz"))[0] == 200
        assert (await get(ingress, "/readyz"))[0] == 200


def requests_total(metrics_text: str, status: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "relay_ingress_requests_total" and sample.labels == {
                "source": "envoice",
                "status": status,
            }:
                return sample.value
    return 0.0


async def test_metrics_count_requests_by_source_and_status() -> None:
    async with offline() as (ingress, _):
        source = ingress.app[SETTINGS].sources[0]
        _, before, _ = await get(ingress, "/metrics")

        await ingress.post(PATH, signed_body(source, activity()))
        await ingress.post(PATH, signed_body(source, activity(), signature="0" * 64))
        await ingress.post(PATH, b"not json")

        status, after, headers = await get(ingress, "/metrics")

    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    for code in ("200", "401", "400"):
        assert requests_total(after, code) == requests_total(before, code) + 1, code
