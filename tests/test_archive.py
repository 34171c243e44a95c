"""The archive (relay.archive, every accepted webhook) and the outcome logs
(relay.<handler>.outcomes, every final delivery outcome): their records, their group commits
before each ack (against fakes), and on the real broker (marked `rabbit`): what lands in them,
retention, create-only declaration, and `relay topology declare`'s report."""

from __future__ import annotations

import asyncio
import contextlib
import re
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelPreconditionFailed, ConnectionInternalError
from pamqp.commands import Basic

from relay import topology, wire
from relay.broker import queue_exists
from relay.config import from_dict as config_from_dict
from relay.config import load as load_config
from relay.ops import topology as ops_topology
from relay.ops.topology import BrokerState, QueueState
from relay.settings import HandlerSettings
from relay.topology import Binding
from relay.worker import partition as partition_module
from relay.worker.delivery import Outcome, Verdict
from relay.worker.outcomes import OutcomeLog
from relay.worker.partition import Delivery, Partition
from relay.worker.scheduler import HandlerScheduler
from tests.conftest import AMQP_URL, MakeSettings, Publish, StartWorker, settings_dict
from tests.fakes import caught_up
from tests.handlers_for_tests import HttpHandler
from tests.processes import (
    Config,
    EnvoiceSender,
    Relay,
    billing_handler,
    http_deliveries,
    ingress_ready,
)
from tests.support import (
    activity,
    declare_topology,
    depth_is,
    events_per_invoice,
    eventually,
    handler,
    management,
    relay_command,
    running_ingress,
    signed_body,
    toml,
)

PATH = "/webhooks/envoice"
FIRST_TRIES = 5

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


def a_partition(broker: Broker) -> tuple[Partition, HandlerScheduler, Channel]:
    billing = {"name": "billing", "events": ["envoice.#"], "url": "http://127.0.0.1:9/"}
    raw = settings_dict("unit", handlers=[{**billing, "partitions": 2}])
    settings = config_from_dict(raw)
    handler: HandlerSettings = settings.handlers[0]
    deliveries = HandlerScheduler(handler, None, settings.repeats)  # type: ignore[arg-type]
    partition = Partition(handler, 1, deliveries)
    caught_up(partition)  # its outcome log read to the end (there is no broker here)
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
async def test_a_record_the_broker_did_not_confirm_is_written_again_before_the_ack(
    logs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(partition_module, "WRITE_RETRY_SECONDS", 0.0)
    broker = Broker()
    partition, deliveries, channel = a_partition(broker)
    delivery = a_delivery(partition, 11, "envoice:1")
    following = a_delivery(partition, 12, "envoice:2")  # the key's next
    ready: list[Delivery] = []
    deliveries.ready = ready.append  # type: ignore[assignment,method-assign]

    # When the broker does not confirm the record (a stream's leader lost, say)
    settling = asyncio.ensure_future(partition.settle(delivery, DELIVERED, None))
    await turns()
    broker.fail(TimeoutError())
    await turns()

    # Then the message is not acked and its key waits, while the record is written again
    assert channel.acked == []
    assert ready == []
    [warning] = [line for line in logs if line["event"] == "outcome not written, trying again"]
    assert (warning["message_id"], warning["log_level"]) == ("envoice:1", "warning")
    await eventually(lambda: broker.waiting == 1, timeout=2, what="the record written again")
    assert [records[0]["id"] for records, _ in broker.published] == ["envoice:1", "envoice:1"]
    # and once confirmed, the message is acked and its key goes on
    broker.confirm()
    await settling
    assert channel.acked == [11]
    assert ready == [following]
    await deliveries.stop()


@pytest.mark.timeout(5)
async def test_a_record_of_a_channel_gone_is_not_written_again() -> None:
    broker = Broker()
    partition, deliveries, channel = a_partition(broker)
    delivery = a_delivery(partition, 11, "envoice:1")

    settling = asyncio.ensure_future(partition.settle(delivery, DELIVERED, None))
    await turns()
    partition.generation += 1  # its channel closed: the broker delivers the message again
    broker.fail(TimeoutError())
    await settling

    assert channel.acked == []
    assert len(broker.published) == 1
    await deliveries.stop()


# --- what `relay topology declare` says about streams -------------------------------------------


def broker_with(*queues: QueueState, bound: bool = True) -> BrokerState:
    bindings = [Binding("relay.activities", "relay.archive", "queue", "#")] if bound else []
    return BrokerState({}, {q.name: q for q in queues}, bindings)


def test_a_stream_with_other_retention_is_reported_with_the_policy_and_not_declared() -> None:
    settings = config_from_dict({"archive": {"max_age": "14D", "max_bytes": 500_000_000}})
    have = {"x-queue-type": "stream", "x-max-age": "7D",
            "x-stream-max-segment-size-bytes": 100_000_000}  # fmt: skip
    broker = broker_with(QueueState("relay.archive", 10, 0, "stream", have))

    plan = ops_topology.plan(topology.describe(settings), broker, "relay.activities")

    assert "relay.archive" not in {q.name for q in plan.declare.queues}
    [line] = [
        line
        for line in ops_topology.plan_lines(plan, prune=False, vhost="prod")
        if "archive" in line
    ]
    assert line == (
        "= stream relay.archive keeps its retention (x-max-age 7D, x-stream-max-segment-size-bytes "
        "100000000; the config says x-max-age 14D, x-max-length-bytes 500000000, "
        "x-stream-max-segment-size-bytes 100000000): the broker refuses to change a stream's "
        "arguments. A policy overrides them: rabbitmqctl set_policy -p prod relay-archive "
        '\'^relay\\.archive$\' \'{"max-age":"14D","max-length-bytes":500000000}\' --apply-to queues'
    )


def test_a_size_limit_the_config_dropped_is_said_to_stay() -> None:
    settings = config_from_dict({})
    have = {"x-queue-type": "stream", "x-max-age": "7D", "x-max-length-bytes": 10**9,
            "x-stream-max-segment-size-bytes": 100_000_000}  # fmt: skip
    broker = broker_with(QueueState("relay.archive", 10, 0, "stream", have))

    plan = ops_topology.plan(topology.describe(settings), broker, "relay.activities")
    [line] = [line for line in ops_topology.plan_lines(plan, prune=False) if "archive" in line]

    assert line.endswith(
        "the broker refuses to change a stream's arguments (x-max-length-bytes stays: a policy "
        "can set another value, not remove it)"
    )


def test_a_stream_with_the_configs_retention_is_neither_declared_nor_reported() -> None:
    settings = config_from_dict({})
    archive = topology.archive_queue(settings.archive)
    broker = broker_with(QueueState("relay.archive", 10, 0, "stream", archive.arguments))

    plan = ops_topology.plan(topology.describe(settings), broker, "relay.activities")

    assert plan.retention == []
    assert ops_topology.plan_lines(plan, prune=False) == [
        "+ exchange relay.activities (topic)",
        "+ exchange relay.unrouted (fanout)",
        "+ queue relay.unrouted",
        "+ queue relay.ids",
        "+ queue relay.state",
        "+ bind relay.unrouted -> relay.unrouted {}",
    ]


def test_a_removed_handlers_outcome_log_is_never_pruned() -> None:
    settings = config_from_dict({})
    gone = Binding("relay.activities", "relay.gone", "exchange", "envoice.#")
    queues = [
        QueueState("relay.gone.0", 0, 0, "quorum"),
        QueueState("relay.gone.outcomes", 0, 0, "stream"),
    ]
    broker = BrokerState({}, {q.name: q for q in queues}, [gone])

    plan = ops_topology.plan(topology.describe(settings), broker, "relay.activities")
    lines = ops_topology.plan_lines(plan, prune=True)

    assert "- queue relay.gone.0 (empty)" in lines
    assert (
        "= stream relay.gone.outcomes is no longer used: kept, its retention expires what it holds "
        "(`rabbitmqctl delete_queue -p / relay.gone.outcomes` removes it now)"
    ) in lines


@pytest.mark.parametrize("bound", [True, False])
def test_an_archive_the_config_turned_off_is_left_and_reported(bound: bool) -> None:
    settings = config_from_dict({"archive": {"enabled": False}})
    broker = broker_with(QueueState("relay.archive", 10, 0, "stream"), bound=bound)

    plan = ops_topology.plan(topology.describe(settings), broker, "relay.activities")
    lines = ops_topology.plan_lines(plan, prune=True)

    assert plan.unbind == []
    [line] = [line for line in lines if "relay.archive" in line]
    assert line.startswith("= stream relay.archive is kept though the config turns the archive off")
    assert ("still bound to the exchange" in line) is bound


# --- on the real broker -----------------------------------------------------------------------


async def set_policy(url: str, name: str, pattern: str, definition: dict[str, Any]) -> None:
    vhost = quote(urlsplit(url).path[1:], safe="")
    policy = {"pattern": pattern, "definition": definition, "apply-to": "queues"}
    async with (
        management(url) as api,
        api.put(f"/api/policies/{vhost}/{name}", json=policy) as put,
    ):
        put.raise_for_status()


async def read_stream(
    url: str,
    queue: str,
    enough: Callable[[list[AbstractIncomingMessage]], bool],
    *,
    offset: Any = "first",
    timeout: float = 20.0,
) -> list[AbstractIncomingMessage]:
    """A stream's messages from `offset` on, read until `enough` of them came (or fail at the
    deadline)."""
    got: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)  # a stream consumer needs a prefetch
        stream = await channel.get_queue(queue, ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            got.append(message)
            await message.ack()  # grants credit only: a stream keeps what is read

        tag = await stream.consume(on_message, arguments={"x-stream-offset": offset})
        try:
            await eventually(lambda: enough(got), timeout=timeout, what=f"enough from {queue}")
        finally:
            await stream.cancel(tag)
    return got


def stream_offset(message: AbstractIncomingMessage) -> int:
    return int(str((message.headers or {})["x-stream-offset"]))


async def first_in_stream(url: str, queue: str) -> AbstractIncomingMessage:
    """The first message a stream holds. A consumer from `first` started while retention
    deletes segments may be refused (RabbitMQ 3.10.8 closes the connection with INTERNAL_ERROR,
    `retries_exhausted` in its log: docs/RABBITMQ.md): then it is asked again, a few times."""
    for _ in range(FIRST_TRIES - 1):
        with contextlib.suppress(ConnectionInternalError):
            return (await read_stream(url, queue, lambda got: len(got) > 0, timeout=10))[0]
    return (await read_stream(url, queue, lambda got: len(got) > 0, timeout=10))[0]


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_every_accepted_webhook_lands_in_the_archive_in_acceptance_order(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    async with Relay(tmp_path) as relay:
        # Given a relay ingress with the archive on (the default)
        config = relay.config(billing_handler(http_handler))
        await relay.run("ingress", config=config)
        ingress = relay.processes[-1]
        await eventually(lambda: ingress_ready(ingress, config), timeout=30, what="ready")
        # When it accepts 300 webhooks over 15 invoices, each invoice's one after another
        sender = EnvoiceSender.to(config)
        await asyncio.wait_for(sender.send(range(1, 16), each=20), 60)
    accepted = {i for ids in sender.ledger.accepted.values() for i in ids}
    assert len(accepted) == 300

    # Then the archive holds each of them once, each invoice's in the order they were accepted
    def ours(messages: list[AbstractIncomingMessage]) -> list[AbstractIncomingMessage]:
        return [m for m in messages if m.message_id in accepted]

    messages = ours(
        await read_stream(
            AMQP_URL, topology.ARCHIVE, lambda got: len(ours(got)) >= 300, offset=since
        )
    )
    assert len(messages) == 300
    archived: dict[str, list[str]] = {}
    for message in messages:
        archived.setdefault(str((message.headers or {})["x-relay-key"]), []).append(
            str(message.message_id)
        )
    assert archived == sender.ledger.accepted
    # as the broker confirmed them: the envelope and the headers of the wire contract
    sample = messages[0]
    envelope = orjson.loads(sample.body)
    assert envelope["id"] == sample.message_id
    assert sample.routing_key == "envoice.paid"
    assert sample.exchange == config.settings.broker.exchange
    assert {"x-relay-source", "x-relay-event", "x-relay-key", "relay-bucket"} <= set(
        sample.headers or {}
    )


@pytest.mark.rabbit
@pytest.mark.timeout(90)
async def test_an_archive_with_a_short_max_age_drops_its_old_segments(
    make_settings: MakeSettings, vhost: str
) -> None:
    # Given an archive keeping 2 s, in segments of 3000 bytes (a few webhooks each)
    archive = {"max_age": "2s", "segment_bytes": 3000}
    settings = make_settings(url=vhost, archive=archive)
    source = settings.sources[0]
    async with running_ingress(settings) as ingress:
        # When 10 webhooks are accepted
        old = []
        for _ in range(10):
            status, answer, _ = await ingress.post(PATH, signed_body(source, activity()))
            assert (status, answer["status"]) == (200, "accepted")
            old.append(answer["id"])
        first = await first_in_stream(vhost, topology.ARCHIVE)
        assert first.message_id == old[0]

        # and more keep coming (retention is applied as segments fill)
        newer: list[str] = []

        async def old_ones_dropped() -> bool:
            status, answer, _ = await ingress.post(PATH, signed_body(source, activity()))
            assert status == 200
            newer.append(answer["id"])
            return (await first_in_stream(vhost, topology.ARCHIVE)).message_id in newer

        # Then the archive drops the old segments: it begins with a later webhook
        await eventually(old_ones_dropped, timeout=60, interval=0.5, what="old segments dropped")
    assert stream_offset(await first_in_stream(vhost, topology.ARCHIVE)) > 0


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_with_the_archive_off_none_is_declared_and_relay_unrouted_takes_what_nobody_binds(
    tmp_path: Path, vhost: str
) -> None:
    async with Relay(tmp_path, url=vhost) as relay:
        # Given an ingress with the archive off, and no handler
        config = relay.config(archive={"enabled": False})
        ingress = await relay.run("ingress", config=config)
        await eventually(lambda: ingress_ready(ingress, config), timeout=30, what="ready")
        # When it accepts a webhook
        sender = EnvoiceSender.to(config)
        await asyncio.wait_for(sender.send([1], each=1), 20)
        assert sender.answers == {"200 accepted": 1}

        # Then there is no archive, and the webhook waits in relay.unrouted
        connection = await aio_pika.connect(vhost)
        async with connection:
            assert not await queue_exists(connection, topology.ARCHIVE)
            channel = await connection.channel()
            await eventually(lambda: depth_is(channel, topology.UNROUTED, 1), what="unrouted")


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_with_the_archive_on_what_no_queue_of_a_handler_takes_is_kept_in_the_archive_only(
    make_settings: MakeSettings, vhost: str
) -> None:
    # Given the archive on, a handler of envoice.paid only, and a handler whose partitions are gone
    settings = make_settings(
        url=vhost,
        handlers=[
            handler({"url": "http://127.0.0.1:9/"}, name="paid", events=["envoice.paid"]),
            handler({"url": "http://127.0.0.1:9/"}, name="gone", events=["envoice.created"]),
        ],
    )
    source = settings.sources[0]
    connection = await aio_pika.connect(vhost)
    async with connection, running_ingress(settings) as ingress:
        channel = await connection.channel()
        await channel.queue_delete(settings.handlers[1].queue(0))
        # When an event nobody binds and one bound to the handler without partitions come
        nobody = activity(Type=7)  # envoice.opened
        unqueued = activity(Type=0)  # envoice.created
        answers = [await ingress.post(PATH, signed_body(source, a)) for a in (nobody, unqueued)]

        # Then both are accepted (the archive took them: nothing comes back to the ingress)
        assert [(status, answer["status"]) for status, answer, _ in answers] == [
            (200, "accepted"),
            (200, "accepted"),
        ]
        # and they are in the archive, while the alternate exchange never fired
        ids = {answer["id"] for _, answer, _ in answers}
        archived = await read_stream(
            vhost, topology.ARCHIVE, lambda got: {m.message_id for m in got} >= ids
        )
        assert [m.message_id for m in archived] == [answer["id"] for _, answer, _ in answers]
        assert await depth_is(channel, topology.UNROUTED, 0)


@pytest.mark.rabbit
@pytest.mark.timeout(30)
async def test_the_broker_refuses_to_declare_a_stream_again_with_other_arguments(
    vhost: str,
) -> None:
    connection = await aio_pika.connect(vhost)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("s", durable=True, arguments=topology.stream("7D", 0, 1000))

        with pytest.raises(ChannelPreconditionFailed, match="x-max-age"):
            await channel.declare_queue(
                "s", durable=True, arguments=topology.stream("14D", 0, 1000)
            )


@pytest.mark.rabbit
@pytest.mark.timeout(150)
async def test_streams_of_other_retention_than_the_config_stop_nothing_and_are_reported(
    tmp_path: Path, http_handler: HttpHandler, vhost: str
) -> None:
    async with Relay(tmp_path, url=vhost) as relay:
        # Given the archive and a handler's outcome log declared with the default retention
        first = relay.config(billing_handler(http_handler))
        declared = await relay_command(
            "topology", "declare", "--config", str(first.path), env={"RELAY_AMQP_URL": vhost}
        )
        assert declared.returncode == 0, declared.stderr
        # When an operator changes both retentions in the config
        raw = tomllib.loads(first.path.read_text())
        raw["archive"] = {"max_age": "14D", "outcomes_max_age": "90D"}
        changed = relay.directory / "changed.toml"
        changed.write_text(toml(raw))
        config = Config(changed, load_config(changed))

        # Then an ingress and a worker of the changed config start, and webhooks flow
        ingress = await relay.run("ingress", config=config)
        await eventually(lambda: ingress_ready(ingress, config), timeout=30, what="ready")
        await relay.worker(config)
        sender = EnvoiceSender.to(config)
        await asyncio.wait_for(sender.send([1], each=3), 20)
        await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), config.settings, timeout=20
        )
        # and `relay topology declare` says how to apply the new retention, changing nothing
        report = await relay_command(
            "topology", "declare", "--config", str(changed), env={"RELAY_AMQP_URL": vhost}
        )
        # and with the archive turned off, it says the archive stays, still bound
        off = relay.directory / "off.toml"
        off.write_text(toml({**raw, "archive": {"enabled": False}}))
        turned_off = await relay_command(
            "topology", "declare", "--config", str(off), env={"RELAY_AMQP_URL": vhost}
        )
    assert report.returncode == 0, report.stderr
    name = urlsplit(vhost).path[1:]
    outcomes = config.settings.handlers[0].outcome_log
    assert report.lines()[:2] == [
        "= stream relay.archive keeps its retention (x-max-age 7D, x-stream-max-segment-size-bytes "
        "100000000; the config says x-max-age 14D, x-stream-max-segment-size-bytes 100000000): "
        "the broker refuses to change a stream's arguments. A policy overrides them: rabbitmqctl "
        f"set_policy -p {name} relay-archive '^relay\\.archive$' '{{\"max-age\":\"14D\"}}' "
        "--apply-to queues",
        f"= stream {outcomes} keeps its retention (x-max-age 30D, x-stream-max-segment-size-bytes "
        "100000000; the config says x-max-age 90D, x-stream-max-segment-size-bytes 100000000): "
        "the broker refuses to change a stream's arguments. A policy overrides them: rabbitmqctl "
        f"set_policy -p {name} {outcomes.replace('.', '-')} "
        f"'^{re.escape(outcomes)}$' '{{\"max-age\":\"90D\"}}' --apply-to queues",
    ]
    assert turned_off.returncode == 0, turned_off.stderr
    assert (
        "= stream relay.archive is kept though the config turns the archive off: it is still "
        "bound to the exchange, so it goes on receiving every webhook and relay.unrouted stays "
        f"empty; `rabbitmqctl delete_queue -p {name} relay.archive` removes it, with every "
        "message it holds"
    ) in turned_off.lines()


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_policy_max_age_overrides_a_streams_argument_longer_or_shorter(
    vhost: str,
) -> None:
    # Given two streams of 3000-byte segments: one keeping 1 h with a policy of 2 s, the other
    # keeping 2 s with a policy of 1 h
    connection = await aio_pika.connect(vhost)
    async with connection:
        channel = await connection.channel()
        for name, age in (("shortened", "1h"), ("lengthened", "2s")):
            arguments = topology.stream(age, 0, 3000)
            await channel.declare_queue(name, durable=True, arguments=arguments)
        await set_policy(vhost, "shortened", "^shortened$", {"max-age": "2s"})
        await set_policy(vhost, "lengthened", "^lengthened$", {"max-age": "1h"})
        published = 0

        async def publish_some() -> None:
            nonlocal published
            for _ in range(10):
                for name in ("shortened", "lengthened"):
                    message = aio_pika.Message(b"x" * 500, message_id=str(published))
                    await channel.default_exchange.publish(message, name)
                published += 1

        # When messages keep coming for longer than 2 s
        async def dropped() -> bool:
            await publish_some()
            first = await first_in_stream(vhost, "shortened")
            return stream_offset(first) > 0

        # Then the policy's 2 s drops the old segments of the stream that argued 1 h
        await eventually(dropped, timeout=40, interval=0.5, what="the shortened stream dropped")
        # and the policy's 1 h keeps those of the stream that argued 2 s
        assert published > 20  # its first messages are older than 2 s too
        assert stream_offset(await first_in_stream(vhost, "lengthened")) == 0


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_handler_of_an_older_relay_gets_its_outcome_log_when_a_worker_starts(
    make_settings: MakeSettings, start_worker: StartWorker, connection: AbstractConnection
) -> None:
    # Given a handler on the broker without an outcome log, as an older relay declared it
    settings = make_settings(handlers=[handler({"url": "http://127.0.0.1:9/"})])
    await declare_topology(settings)
    outcome_log = settings.handlers[0].outcome_log
    await (await connection.channel()).queue_delete(outcome_log)
    assert not await queue_exists(connection, outcome_log)

    # When a worker of this relay starts
    await start_worker(settings)

    # Then the outcome log exists, with the config's retention
    assert await queue_exists(connection, outcome_log)
    queue = await (await connection.channel()).declare_queue(
        outcome_log,
        durable=True,
        arguments=topology.outcome_log_queue(settings.archive, settings.handlers[0]).arguments,
    )
    assert queue.name == outcome_log  # declared again with the same arguments: accepted


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_every_delivered_and_dead_lettered_message_has_one_outcome_record(
    make_settings: MakeSettings,
    publish: Publish,
    start_worker: StartWorker,
    http_handler: HttpHandler,
) -> None:
    # Given a handler that rejects some messages (422), fails one once (503), takes the rest
    settings = make_settings(handlers=[handler({"url": http_handler.url}, partitions=2)])
    events = [e for each in events_per_invoice(settings, 10, 10).values() for e in each]
    rejected = {e.message_id for e in events[3::17]}
    for message_id in rejected:
        http_handler.plan(message_id, [422])
    retried = events[5].message_id
    http_handler.plan(retried, [503, 200])
    # When 100 webhooks are published and delivered
    await publish(settings, *events)
    await start_worker(settings)
    await eventually(lambda: len({r.id for r in http_handler.requests}) == 100, timeout=60,
                     what="every message tried")  # fmt: skip

    # Then the outcome log holds one record per message: delivered or dead-lettered
    outcome_log = settings.handlers[0].outcome_log
    records = await read_outcome_records(outcome_log, 100)
    by_id = {r["id"]: r for r in records}
    assert len(records) == 100
    assert by_id.keys() == {e.message_id for e in events}
    delivered = {r["id"] for r in records if r["outcome"] == "delivered"}
    assert delivered == set(http_handler.accepted())
    for message_id in rejected:
        assert by_id[message_id]["outcome"] == "dead-lettered"
        assert (by_id[message_id]["status"], by_id[message_id]["reason"]) == (422, "HTTP 422")
        assert by_id[message_id]["attempts"] == 1
    assert (by_id[retried]["outcome"], by_id[retried]["attempts"]) == ("delivered", 2)
    # with the message's key, bucket, partition and acceptance time
    for event in events:
        record = by_id[event.message_id]
        assert record["handler"] == settings.handlers[0].name
        assert record["key"] == event.key
        assert record["bucket"] == wire.bucket(event.key)
        assert record["partition"] == settings.handlers[0].queue(wire.bucket(event.key) % 2)
        [request, *_] = http_handler.of(event.message_id)
        assert record["received_at"] == request.json["received_at"]
        assert record["replayed"] is False
        if event.message_id not in rejected:
            assert (record["status"], record["reason"]) == (200, None)
        assert datetime.fromisoformat(record["at"]) >= datetime.fromisoformat(record["received_at"])


async def read_outcome_records(queue: str, count: int) -> list[dict[str, Any]]:
    def records(messages: list[AbstractIncomingMessage]) -> list[dict[str, Any]]:
        return [r for m in messages for r in wire.read_outcomes(m.body)]

    messages = await read_stream(AMQP_URL, queue, lambda got: len(records(got)) >= count)
    assert all((m.headers or {})["x-relay-handler"] == records([m])[0]["handler"] for m in messages)
    return records(messages)
