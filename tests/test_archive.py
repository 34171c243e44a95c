"""The archive (relay.archive, every accepted webhook) and the outcome logs
(relay.<handler>.outcomes, every final delivery outcome): their records, their group commits
before each ack (against fakes), and on the real broker (marked `rabbit`): what lands in them,
retention, create-only declaration, and `relay topology declare`'s report."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest
from pamqp.commands import Basic

from relay import wire
from relay.config import from_dict as config_from_dict
from relay.settings import HandlerSettings
from relay.worker.delivery import Outcome, Verdict
from relay.worker.handler import HandlerDeliveries
from relay.worker.outcomes import OutcomeLog
from relay.worker.partition import Delivery, Partition
from tests.conftest import settings_dict

RECEIVED_AT = "2026-12-07T10:00:00.123456Z"
DELIVERED = Outcome(Verdict.SUCCESS, "HTTP 200", 200)
REJECTED = Outcome(Verdict.PERMANENT, "HTTP 422", 422)


# --- records ----------------------------------------------------------------------------------


def properties(message_id: str = "envoice:1", headers: dict[str, Any] | None = None) -> Any:
    return Basic.Properties(
        message_id=message_id,
        timestamp=datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC),
        headers={"x-relay-key": "invoice:7", **(headers or {})},
    )


def envelope(message_id: str = "envoice:1") -> bytes:
    return orjson.dumps({"id": message_id, "key": "invoice:7", "received_at": RECEIVED_AT})


def record(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "outcome": wire.DELIVERED,
        "handler": "billing",
        "key": "invoice:7",
        "bucket": 5,
        "partition": "relay.billing.1",
        "attempts": 1,
        "status": 200,
        "reason": None,
        "at": datetime(2026, 12, 7, 10, 0, 1, 5, tzinfo=UTC),
    }
    body = overrides.pop("body", envelope())
    message = overrides.pop("message", properties())
    return wire.outcome_record(body, message, **{**fields, **overrides})


def test_an_outcome_record_has_every_field() -> None:
    assert record() == {
        "outcome": "delivered",
        "handler": "billing",
        "id": "envoice:1",
        "key": "invoice:7",
        "bucket": 5,
        "partition": "relay.billing.1",
        "attempts": 1,
        "at": "2026-12-07T10:00:01.000005Z",
        "received_at": RECEIVED_AT,
        "status": 200,
        "reason": None,
        "replayed": False,
    }


def test_a_dead_letter_record_carries_its_reason_and_status() -> None:
    dead = record(outcome=wire.DEAD_LETTERED, status=422, reason="HTTP 422", attempts=3)

    assert (dead["outcome"], dead["status"], dead["reason"], dead["attempts"]) == (
        "dead-lettered",
        422,
        "HTTP 422",
        3,
    )


def test_a_replayed_message_is_marked_and_a_foreign_one_takes_its_amqp_timestamp() -> None:
    replayed = record(message=properties(headers={wire.REPLAYED_HEADER: True}))
    foreign = record(body=b"not json")

    assert replayed["replayed"] is True
    assert foreign["received_at"] == "2026-12-07T10:00:00.000000Z"
    assert record(body=b"[]", message=Basic.Properties())["received_at"] is None


def test_outcome_messages_carry_their_records_and_are_read_back() -> None:
    records = [record(), record(outcome=wire.DEAD_LETTERED, reason="HTTP 410", status=410)]

    message = wire.outcomes_message(records)

    assert message.headers == {"x-relay-handler": "billing"}
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert wire.read_outcomes(message.body) == records


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"kind": "state"}', b'{"outcomes": 3}', b'{"outcomes": [1]}'],
)
def test_what_is_not_an_outcome_message_reads_as_no_records(body: bytes) -> None:
    assert wire.read_outcomes(body) == []


# --- group commits ----------------------------------------------------------------------------


class Broker:
    """A fake publish: keeps what it was given; each publish waits until the test lets it
    through (`confirm`) or fails it (`fail`)."""

    def __init__(self) -> None:
        self.published: list[tuple[list[dict[str, Any]], str]] = []
        self._pending: list[asyncio.Future[None]] = []

    async def publish(self, message: aio_pika.Message, queue: str) -> None:
        self.published.append((wire.read_outcomes(message.body), queue))
        confirm = asyncio.get_running_loop().create_future()
        self._pending.append(confirm)
        await confirm

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self._pending)

    def confirm(self) -> None:
        self._pending[-1].set_result(None)

    def fail(self, error: Exception) -> None:
        self._pending[-1].set_exception(error)


async def turns(n: int = 5) -> None:
    """Let the loop run `n` iterations (the writer and the tasks it wakes)."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.timeout(5)
async def test_records_ending_together_go_in_one_message_and_wait_for_its_confirm() -> None:
    broker = Broker()
    outcomes = OutcomeLog("relay.billing.outcomes")
    outcomes.start(broker.publish)
    # Given three records written in one loop iteration
    first = [asyncio.ensure_future(outcomes.write(record(bucket=n))) for n in range(3)]
    await turns()
    # Then they went in one message, and none is confirmed until the broker confirms it
    assert [[r["bucket"] for r in records] for records, _ in broker.published] == [[0, 1, 2]]
    assert broker.published[0][1] == "relay.billing.outcomes"
    assert not any(w.done() for w in first)
    # When two more come while that publish is in flight
    second = [asyncio.ensure_future(outcomes.write(record(bucket=n))) for n in (3, 4)]
    await turns()
    assert len(broker.published) == 1  # one publish in flight at a time: they wait together
    broker.confirm()
    await turns()
    # Then the first three are confirmed, and the next two leave together in the next message
    assert all(w.done() and w.exception() is None for w in first)
    assert [[r["bucket"] for r in records] for records, _ in broker.published][1] == [3, 4]
    assert not any(w.done() for w in second)
    broker.confirm()
    await asyncio.gather(*second)
    await outcomes.stop()


@pytest.mark.timeout(5)
async def test_a_failed_publish_fails_every_record_of_its_message() -> None:
    broker = Broker()
    outcomes = OutcomeLog("relay.billing.outcomes")
    outcomes.start(broker.publish)
    writes = [asyncio.ensure_future(outcomes.write(record(bucket=n))) for n in range(2)]
    await turns()

    broker.fail(TimeoutError())
    done = await asyncio.gather(*writes, return_exceptions=True)

    assert [type(e) for e in done] == [TimeoutError, TimeoutError]
    # and the writer goes on with the next records
    later = asyncio.ensure_future(outcomes.write(record()))
    await turns()
    broker.confirm()
    await later
    await outcomes.stop()


@pytest.mark.timeout(5)
async def test_a_record_waiting_when_the_log_stops_fails() -> None:
    broker = Broker()
    outcomes = OutcomeLog("relay.billing.outcomes")
    outcomes.start(broker.publish)
    waiting = asyncio.ensure_future(outcomes.write(record()))
    await turns()

    await outcomes.stop()

    with pytest.raises(ConnectionError):
        await waiting
    with pytest.raises(ConnectionError):  # and nothing is written without a session
        await outcomes.write(record())


# --- the ack waits for the record -------------------------------------------------------------


class Channel:
    """The partition's channel, as far as acks go."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    async def basic_ack(self, tag: int, wait: bool = False) -> None:
        self.acked.append(tag)


def a_partition(broker: Broker) -> tuple[Partition, HandlerDeliveries, Channel]:
    billing = {"name": "billing", "events": ["envoice.#"], "url": "http://127.0.0.1:9/"}
    raw = settings_dict("unit", handlers=[{**billing, "partitions": 2}])
    handler: HandlerSettings = config_from_dict(raw).handlers[0]
    deliveries = HandlerDeliveries(handler, target=None)  # type: ignore[arg-type]
    partition = Partition(handler, 1, deliveries)
    channel = Channel()
    partition._channel = channel
    deliveries.partitions.append(partition)

    async def publish(message: aio_pika.Message, queue: str) -> None:
        if queue.endswith(".outcomes"):
            await broker.publish(message, queue)

    deliveries._publish = publish
    deliveries._outcome_log.start(publish)
    return partition, deliveries, channel


def a_delivery(partition: Partition, tag: int, message_id: str) -> Delivery:
    delivery = Delivery(
        partition=partition, generation=partition.generation, tag=tag, key="invoice:7",
        bucket=5, held_by=None, message_id=message_id, body=envelope(message_id),
        properties=properties(message_id), earlier=0, attempts=2,
    )  # fmt: skip
    partition._keys.add(delivery)
    return delivery


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("outcome", "dead_letter", "expected"),
    [
        (DELIVERED, None, ("delivered", 200, None)),
        (REJECTED, "HTTP 422", ("dead-lettered", 422, "HTTP 422")),
    ],
)
async def test_a_message_is_acked_only_once_its_outcome_record_is_confirmed(
    outcome: Outcome, dead_letter: str | None, expected: tuple[Any, ...]
) -> None:
    broker = Broker()
    partition, deliveries, channel = a_partition(broker)
    delivery = a_delivery(partition, 11, "envoice:1")

    settling = asyncio.ensure_future(partition.settle(delivery, outcome, dead_letter))
    await turns()

    # the record is on its way, the message not acked
    [(records, queue)] = broker.published
    assert queue == "relay.billing-unit.outcomes"
    [written] = records
    assert (written["outcome"], written["status"], written["reason"]) == expected
    assert (written["id"], written["attempts"], written["partition"]) == (
        "envoice:1",
        2,
        "relay.billing-unit.1",
    )
    assert channel.acked == []
    # acked once the broker confirmed it
    broker.confirm()
    await settling
    assert channel.acked == [11]
    await deliveries.stop()


@pytest.mark.timeout(5)
async def test_a_message_whose_record_failed_is_not_acked_and_its_key_waits(
    logs: list[dict[str, Any]],
) -> None:
    broker = Broker()
    partition, deliveries, channel = a_partition(broker)
    delivery = a_delivery(partition, 11, "envoice:1")
    a_delivery(partition, 12, "envoice:2")  # the key's next
    ready: list[Delivery] = []
    deliveries.ready = ready.append  # type: ignore[assignment,method-assign]

    settling = asyncio.ensure_future(partition.settle(delivery, DELIVERED, None))
    await turns()
    broker.fail(TimeoutError())
    await settling

    assert channel.acked == []
    assert ready == []  # the key's next message waits: this one comes again first
    [warning] = [line for line in logs if line["event"].startswith("outcome not recorded")]
    assert warning["message_id"] == "envoice:1"
    assert warning["log_level"] == "warning"
    await deliveries.stop()
