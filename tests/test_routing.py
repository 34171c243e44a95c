"""What an accepted webhook becomes on the broker: routing key, properties, body
(docs/CONFIGURATION.md, "Routing"; docs/ARCHITECTURE.md, "The wire contract")."""

from __future__ import annotations

import re
import uuid
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from relay import topology
from relay.settings import Settings
from tests.conftest import MakeSettings
from tests.support import Ingress, activity, eventually, running_ingress, signed_body

pytestmark = pytest.mark.rabbit

PATH = "/webhooks/envoice"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)


def handler(events: list[str], partitions: int = 1) -> dict[str, Any]:
    return {
        "name": "billing",
        "events": events,
        "url": "http://a.invalid/",
        "partitions": partitions,
    }


class Tap:
    """An ingress plus a queue of our own bound with "#", as a downstream service binds one."""

    def __init__(self, settings: Settings, ingress: Ingress, queue: AbstractQueue) -> None:
        self.settings, self.ingress, self.queue = settings, ingress, queue

    async def post(self, act: dict[str, Any]) -> str:
        """Post a signed webhook; return the message id of the accepted event."""
        body = signed_body(self.settings.sources[0], act)
        status, answer, _ = await self.ingress.post(PATH, body)
        assert (status, answer.get("status")) == (200, "accepted"), answer
        message_id: str = answer["id"]
        return message_id

    async def relay(self, act: dict[str, Any]) -> tuple[AbstractIncomingMessage, dict[str, Any]]:
        """Post `act` and read back what was published for it: the message and its body."""
        message_id = await self.post(act)
        message = await eventually(
            lambda: self.queue.get(no_ack=True, fail=False), what="the published message"
        )
        assert message.message_id == message_id
        return message, orjson.loads(message.body)


@pytest.fixture
async def tap(make_settings: MakeSettings, channel: AbstractChannel) -> AsyncIterator[Tap]:
    settings = make_settings()
    async with running_ingress(settings) as ingress:  # declares the exchange
        queue = await channel.declare_queue(
            f"relay.test-{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True
        )
        await queue.bind(settings.broker.exchange, routing_key="#")
        yield Tap(settings, ingress, queue)


async def depths(channel: AbstractChannel, settings: Settings) -> list[int]:
    """Messages in each partition queue of the (only) handler, in partition order."""
    counts = []
    for name in settings.handlers[0].queues:
        queue = await channel.declare_queue(name, passive=True)
        assert queue.declaration_result.message_count is not None
        counts.append(queue.declaration_result.message_count)
    return counts


async def wait_for_total(channel: AbstractChannel, settings: Settings, total: int) -> list[int]:
    async def reached() -> list[int] | None:
        counts = await depths(channel, settings)
        return counts if sum(counts) >= total else None

    counts: list[int] = await eventually(reached, what=f"{total} messages in the partitions")
    assert sum(counts) == total, counts
    return counts


@pytest.mark.parametrize(
    ("sent_type", "routing_key", "code"),
    [
        (11, "envoice.paid", 11),
        (16, "envoice.new_payment_with_stripe", 16),
        (0, "envoice.created", 0),
        (48, "envoice.invoice_digitally_signed", 48),
        ("Paid", "envoice.paid", 11),
        ("NewPaymentWithBamboraEU", "envoice.new_payment_with_bambora_eu", 32),
        (77, "envoice.type_77", 77),
    ],
)
async def test_routing_key_is_source_and_snake_case_event(
    tap: Tap, sent_type: int | str, routing_key: str, code: int
) -> None:
    message, body = await tap.relay(activity(Type=sent_type))

    assert message.routing_key == routing_key
    event = routing_key.removeprefix("envoice.")
    assert (body["source"], body["event"], body["type"]) == ("envoice", event, code)
    assert message.headers["x-relay-event"] == event
    assert body["data"]["Type"] == sent_type  # data is the Activity as sent


async def test_message_properties_and_body(tap: Tap) -> None:
    act = activity(
        Type=14,
        CreatedOn="2026-11-28T11:59:59.1234567Z",
        Message="Zahlung erhalten \u20ac",
        Extra={"not": ["in", "the", "spec"]},
    )
    message, body = await tap.relay(act)
    now = datetime.now(UTC)
    message_id = f"envoice:{act['Id']}"

    assert message.delivery_mode == 2
    assert message.content_type == "application/json"
    assert message.message_id == message_id
    assert message.timestamp is not None
    assert abs(message.timestamp.replace(tzinfo=UTC) - now) < timedelta(seconds=60)
    assert message.headers == {
        "x-relay-source": "envoice",
        "x-relay-event": "new_manual_payment",
        "x-relay-key": "invoice:42",
        "relay-bucket": str(zlib.crc32(b"invoice:42") % 64),
    }

    received_at = body.pop("received_at")
    assert RFC3339.fullmatch(received_at), received_at
    parsed = datetime.fromisoformat(received_at)
    assert parsed.utcoffset() == timedelta(0)
    assert abs(parsed - now) < timedelta(seconds=60)
    assert body == {
        "id": message_id,
        "source": "envoice",
        "event": "new_manual_payment",
        "type": 14,
        "key": "invoice:42",
        "occurred_at": "2026-11-28T11:59:59.1234567Z",
        "data": act,
    }


@pytest.mark.parametrize(
    ("ids", "key"),
    [
        pytest.param({"InvoiceId": 42, "OrderId": 7}, "invoice:42", id="invoice"),
        pytest.param({"InvoiceId": 0, "OrderId": 7}, "order:7", id="order-when-no-invoice"),
        pytest.param({"InvoiceId": None, "OrderId": 7}, "order:7", id="order-when-invoice-null"),
        pytest.param({"InvoiceId": 0, "OrderId": 0, "Id": 9001}, "activity:9001", id="activity"),
    ],
)
async def test_ordering_key(tap: Tap, ids: dict[str, Any], key: str) -> None:
    message, body = await tap.relay(activity(**ids))

    assert body["key"] == key
    assert message.headers["x-relay-key"] == key


async def test_event_no_handler_binds_lands_in_relay_unrouted(
    make_settings: MakeSettings, channel: AbstractChannel
) -> None:
    # Given a handler that binds only envoice.paid, and no archive (bound to the exchange for
    # every routing key, it would take the event: the alternate exchange never fires)
    settings = make_settings(handlers=[handler(["envoice.paid"])], archive={"enabled": False})
    async with running_ingress(settings) as ingress:
        # When an event of another type is accepted
        act = activity(Type=0)
        status, answer, _ = await ingress.post(PATH, signed_body(settings.sources[0], act))
        assert (status, answer["status"]) == (200, "accepted")

    # Then it waits in the shared relay.unrouted queue, and not in the handler's partitions
    unrouted = await channel.declare_queue(topology.UNROUTED, passive=True)

    async def drained_until_ours() -> AbstractIncomingMessage | None:
        while (message := await unrouted.get(fail=False)) is not None:
            await message.ack()
            if message.message_id == answer["id"]:
                return message
        return None

    message = await eventually(drained_until_ours, what="our message in relay.unrouted")
    assert message.routing_key == "envoice.created"
    assert orjson.loads(message.body)["data"] == act
    assert await depths(channel, settings) == [0]


async def test_one_key_always_lands_in_the_same_partition(
    make_settings: MakeSettings, channel: AbstractChannel
) -> None:
    # Given a handler of 4 partitions
    settings = make_settings(handlers=[handler(["envoice.#"], partitions=4)])
    async with running_ingress(settings) as ingress:
        # When several events of different types come for one invoice
        for i, kind in enumerate([11, 14, 16, 0, 7, 12, 11, 3]):
            act = activity(Type=kind, InvoiceId=7001, Id=activity()["Id"] + i)
            status, _, _ = await ingress.post(PATH, signed_body(settings.sources[0], act))
            assert status == 200

    # Then they all wait in one partition queue
    counts = await wait_for_total(channel, settings, 8)
    assert sorted(counts) == [0, 0, 0, 8], counts


async def test_different_keys_spread_over_partitions(
    make_settings: MakeSettings, channel: AbstractChannel
) -> None:
    settings = make_settings(handlers=[handler(["envoice.#"], partitions=4)])
    async with running_ingress(settings) as ingress:
        for invoice in range(1, 33):
            act = activity(InvoiceId=invoice, Id=activity()["Id"] + invoice)
            status, _, _ = await ingress.post(PATH, signed_body(settings.sources[0], act))
            assert status == 200

    counts = await wait_for_total(channel, settings, 32)
    assert sum(1 for count in counts if count) > 1, counts
