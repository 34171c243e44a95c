"""`relay trace`: a webhook's journey from the archive and the outcome logs. Building journeys
from records runs without a broker; delivered, dead-lettered and pending webhooks are traced on
the real broker (marked `rabbit`) with `relay ingress` and `relay worker` processes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from pamqp.commands import Basic

from relay import replays, wire
from relay.errors import NotFound
from relay.ops import trace
from relay.ops.trace import Journey, Webhook
from relay.settings import HandlerSettings
from relay.streams import Entry, read_stream, stream_end
from tests.handlers_for_tests import HttpHandler
from tests.processes import Config, Relay, billing_handler
from tests.support import (
    AMQP_URL,
    activity,
    declare_topology,
    eventually,
    relay_command,
    run_relay,
    signed_body,
)

ACCEPTED = datetime(2026, 12, 7, 14, 0, 0, 123456, tzinfo=UTC)

# --- without a broker -------------------------------------------------------------------------


def webhook(message_id: str = "envoice:1", offset: int = 10, **fields: Any) -> Webhook:
    return Webhook(
        **{
            "id": message_id,
            "source": "envoice",
            "event": "envoice.paid",
            "key": "invoice:42",
            "bucket": wire.bucket("invoice:42"),
            "accepted_at": ACCEPTED,
            "offset": offset,
            **fields,
        }
    )


def handler(name: str = "billing", events: tuple[str, ...] = ("envoice.#",)) -> HandlerSettings:
    return HandlerSettings(name=name, events=events, bindings=events, partitions=4)


def record(message_id: str = "envoice:1", **fields: Any) -> dict[str, Any]:
    return {
        "outcome": wire.DELIVERED,
        "handler": "billing",
        "id": message_id,
        "key": "invoice:42",
        "bucket": wire.bucket("invoice:42"),
        "partition": "relay.billing.2",
        "attempts": 2,
        "at": "2026-12-07T14:00:01.500000Z",
        "received_at": "2026-12-07T14:00:00.123456Z",
        "status": 200,
        "reason": None,
        "replayed": False,
        **fields,
    }


def test_a_delivered_webhook_has_its_time_and_attempts_and_its_replays_follow() -> None:
    replayed = record(at="2026-12-07T15:00:00.000000Z", attempts=1, replayed=True)
    records = {"billing": [record("envoice:0"), replayed, record()]}

    traced = trace.journey(webhook(), [handler()], records, None)

    [leg] = traced.as_dict()["handlers"]
    assert leg == {
        "name": "billing",
        "state": "delivered",
        "at": "2026-12-07T14:00:01.500000Z",
        "attempts": 2,
        "status": 200,
        "reason": None,
        "partition": "relay.billing.2",
        "behind": None,
        "replays": [
            {"state": "delivered", "at": "2026-12-07T15:00:00.000000Z", "attempts": 1,
             "status": 200, "reason": None}
        ],
    }  # fmt: skip


def test_a_dead_lettered_webhook_has_its_reason_and_status() -> None:
    dead = record(outcome=wire.DEAD_LETTERED, status=422, reason="HTTP 422", attempts=1)

    [leg] = trace.journey(webhook(), [handler()], {"billing": [dead]}, None).legs

    assert (leg.state, leg.final) == (
        "dead-lettered",
        trace.Recorded("dead-lettered", "2026-12-07T14:00:01.500000Z", 1, 422, "HTTP 422",
                       "relay.billing.2"),
    )  # fmt: skip


def test_a_pending_webhook_waits_in_its_partition_behind_earlier_ones_without_an_outcome() -> None:
    # Given, of key invoice:42: 1 delivered, 2 dead-lettered, 3 pending, 3 again (a repeat),
    # 4 of an event billing does not bind, then 5 (traced); 6 of another key; 7 after it
    history = [
        webhook("envoice:1", 1),
        webhook("envoice:2", 2),
        webhook("envoice:3", 3),
        webhook("envoice:3", 4),
        webhook("envoice:4", 5, event="envoice.sent"),
        webhook("envoice:5", 7),
        webhook("envoice:7", 8),
    ]
    records = {"billing": [record("envoice:1"), record("envoice:2", outcome=wire.DEAD_LETTERED)]}
    billing = handler(events=("envoice.paid",))

    [leg] = trace.journey(webhook("envoice:5", 7), [billing], records, history).legs

    # Then it waits in the partition its bucket maps to, behind 3 only
    assert (leg.state, leg.partition, leg.behind) == (
        "pending",
        f"relay.billing.{wire.bucket('invoice:42') % 4}",
        1,
    )
    # and not knowing the earlier ones, behind is unknown
    [unknown] = trace.journey(webhook("envoice:5", 7), [billing], records, None).legs
    assert (unknown.state, unknown.behind) == ("pending", None)


def test_only_the_handlers_whose_bindings_match_the_event_have_a_leg() -> None:
    handlers = [handler("a", ("envoice.paid",)), handler("b", ("invoice.*",)),
                handler("c", ("#",))]  # fmt: skip

    traced = trace.journey(webhook(), handlers, {}, [])

    assert [(leg.name, leg.state, leg.behind) for leg in traced.legs] == [
        ("a", "pending", 0),
        ("c", "pending", 0),
    ]
    unbound = trace.journey(webhook(event="envoice.sent"), [handlers[0]], {}, [])
    assert unbound.legs == ()
    assert "no handler of the config binds envoice.sent" in unbound.render()


def test_the_text_says_when_where_and_how() -> None:
    dead = record("envoice:1", outcome=wire.DEAD_LETTERED, status=422, reason="HTTP 422")
    records = {"billing": [dead], "ledger": [record(handler="ledger", partition="relay.ledger.0")]}
    handlers = [handler("billing"), handler("ledger"), handler("audit")]

    text = trace.journey(webhook(), handlers, records, [webhook("envoice:0", 1)]).render()

    assert text.splitlines() == [
        "envoice:1 accepted 2026-12-07T14:00:00.123456Z from source envoice",
        "  event envoice.paid, key invoice:42",
        "  billing  dead-lettered  2026-12-07T14:00:01.500000Z after 2 attempts: HTTP 422 "
        "(status 422)",
        "  ledger   delivered      2026-12-07T14:00:01.500000Z after 2 attempts (relay.ledger.0)",
        f"  audit    pending        in relay.audit.{wire.bucket('invoice:42') % 4}, "
        "behind 1 earlier webhook of its key",
    ]


def test_a_webhook_is_read_from_its_archived_message() -> None:
    body = orjson.dumps({"id": "envoice:9", "source": "envoice", "key": "invoice:7",
                         "received_at": "2026-12-07T14:00:00.123456Z"})  # fmt: skip
    headers: dict[str, Any] = {wire.SOURCE_HEADER: "envoice-eu", wire.KEY_HEADER: "invoice:7",
               wire.BUCKET_HEADER: "5", "x-stream-offset": 77}  # fmt: skip
    properties = Basic.Properties(message_id="envoice:9", headers=headers)

    read = Webhook.of(Entry(77, "relay.activities", "envoice.paid", properties, body))

    assert read == Webhook("envoice:9", "envoice-eu", "envoice.paid", "invoice:7", 5,
                           ACCEPTED, 77)  # fmt: skip


def test_with_the_broker_unreachable_trace_exits_3(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[broker]\nurl = "amqp://guest:guest@127.0.0.1:1/"\n', encoding="utf-8")

    result = run_relay("trace", "envoice:1", "--config", str(config), unset=("RELAY_AMQP_URL",))

    assert result.returncode == 3
    [line] = result.stderr.splitlines()
    assert line.startswith("relay: broker unreachable: amqp://guest:***@127.0.0.1:1/"), line


# --- reading a stream to its end, on the broker -----------------------------------------------

BURST = 2000


async def read_up_to(connection: aio_pika.abc.AbstractConnection, stream: str, last: int) -> None:
    """Consume `stream` from its first message until the one whose body is `last`."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    queue = await channel.get_queue(stream, ensure=False)
    arrived: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(arrived.put, arguments={"x-stream-offset": "first"})
    async with asyncio.timeout(20):
        while int((message := await arrived.get()).body) != last:
            await message.ack()
    await channel.close()


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_read_ends_at_the_newest_message_present_when_it_began_while_writes_go_on() -> None:
    name = f"relay.test-trace-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()  # confirms each publish
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "stream"})
        try:
            # Given an empty stream: no end, and nothing to read
            assert await stream_end(connection, name, "") is None
            # and then 2000 messages written in a burst without confirms (the last chunk then
            # usually holds several), all there once a plain reader has the last one
            burst = await (
                await connection.channel(publisher_confirms=False)
            ).get_underlay_channel()
            for n in range(BURST):
                await burst.basic_publish(b"%d" % n, routing_key=name)
            await read_up_to(connection, name, BURST - 1)
            written = BURST

            # When its end is found: the newest message's offset, the last of its last chunk
            end = await stream_end(connection, name, "")
            assert end == BURST - 1

            async def write(count: int) -> None:
                nonlocal written
                publishes = []
                for _ in range(count):  # started in order: one channel keeps it
                    message = aio_pika.Message(b"%d" % written)
                    publishes.append(asyncio.ensure_future(
                        channel.default_exchange.publish(message, name)))  # fmt: skip
                    written += 1
                await asyncio.gather(*publishes)

            # and one reads from the start to that end while writes go on
            async def keep_writing() -> None:
                while True:
                    await write(5)

            writer = asyncio.create_task(keep_writing())
            try:
                assert await stream_end(connection, name, "") is not None  # reads the writes too
                got = [int(e.body) async for e in read_stream(connection, name, replays.EPOCH, end)]
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer

            # Then it got every message written before it began, in order, and it ended there
            assert got == list(range(BURST))
            # and nothing comes from a time after the last chunk
            later = datetime.now(UTC) + timedelta(minutes=1)
            assert [e async for e in read_stream(connection, name, later, end)] == []
            # and the reader wrote nothing into the stream
            last = await stream_end(connection, name, "")
            assert last is not None
            everything = [int(e.body) async for e in read_stream(connection, name, replays.EPOCH,
                                                                last)]  # fmt: skip
            assert everything == list(range(len(everything)))
            assert written - 5 <= len(everything) <= written  # (a cancelled write may be lost)
        finally:
            await (await connection.channel()).queue_delete(name)
        # and a stream that does not exist is named
        with pytest.raises(NotFound, match=f"{name} does not exist: declare it"):
            await stream_end(connection, name, "declare it")


# --- against the broker -----------------------------------------------------------------------


def new_id() -> int:
    return uuid.uuid4().int % 10**15


async def post(config: Config, event_id: int, invoice: int) -> str:
    """POST one signed Envoice webhook; its message id, once the ingress accepted it."""
    act = activity(Id=event_id, InvoiceId=invoice, InvoiceNumber=f"INV-{invoice}")
    body = signed_body(config.settings.sources[0], act)
    async with aiohttp.ClientSession() as client, client.post(config.webhook_url, data=body) as r:
        answer = await r.json(content_type=None)
    assert (r.status, answer["status"]) == (200, "accepted"), answer
    return str(answer["id"])


async def traced(config: Config, message_id: str, since: datetime) -> Journey:
    return await trace.trace_id(config.settings, message_id, since)


def states(journey: Journey) -> dict[str, str]:
    return {leg.name: leg.state for leg in journey.legs}


async def run_trace(config: Config, *args: str) -> tuple[int, str, str]:
    done = await relay_command("trace", *args, "--config", str(config.path), timeout=30)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_webhook_delivered_after_a_503_is_traced_with_its_time_and_2_attempts(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given a handler that answers a webhook 503, then 200
        config = relay.config(billing_handler(http_handler))
        await relay.start(config)
        since = datetime.now(UTC)
        event_id = new_id()
        http_handler.plan(f"envoice:{event_id}", [503])
        message_id = await post(config, event_id, invoice=42)
        name = config.settings.handlers[0].name

        # When it has been delivered
        async def delivered() -> Journey | None:
            journey = await traced(config, message_id, since)
            return journey if states(journey) == {name: "delivered"} else None

        journey = await eventually(delivered, timeout=30, interval=0.5, what="traced delivered")
        code, out, err = await run_trace(config, message_id, "--since", "10m")

    # Then trace shows when it was accepted, by whom, and its delivery at the second attempt
    assert [r.status for r in http_handler.of(message_id)] == [503, 200]
    [leg] = journey.legs
    assert leg.final is not None
    at = datetime.fromisoformat(leg.final.at)
    assert since <= journey.webhook.accepted_at <= at <= datetime.now(UTC)
    assert (leg.final.attempts, leg.final.status) == (2, 200)
    assert leg.partition == f"relay.{name}.{wire.bucket('invoice:42') % 4}"
    w = journey.webhook
    assert (w.id, w.source, w.event, w.key) == (message_id, "envoice", "envoice.paid", "invoice:42")
    assert code == 0, err
    assert out.splitlines() == [
        f"{message_id} accepted {trace._rfc3339(w.accepted_at)} from source envoice",
        "  event envoice.paid, key invoice:42",
        f"  {name}  delivered      {leg.final.at} after 2 attempts ({leg.partition})",
    ]


async def one_webhook(
    relay: Relay, http_handler: HttpHandler, status: int, *, invoice: int
) -> tuple[Config, datetime, str, str]:
    """relay running a billing handler that answers `status`, and one webhook of `invoice`
    accepted: (config, a time before it, its message id, the handler's name)."""
    http_handler.default = status
    config = relay.config(billing_handler(http_handler))
    await relay.start(config)
    since = datetime.now(UTC)
    message_id = await post(config, new_id(), invoice=invoice)
    return config, since, message_id, config.settings.handlers[0].name


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_dead_lettered_webhook_is_traced_with_its_reason_and_status(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given a handler that rejects everything with 422, and a webhook
        config, since, message_id, name = await one_webhook(relay, http_handler, 422, invoice=5)

        # When it has been dead-lettered
        async def dead() -> Journey | None:
            journey = await traced(config, message_id, since)
            return journey if states(journey) == {name: "dead-lettered"} else None

        await eventually(dead, timeout=30, interval=0.5, what="traced dead-lettered")
        code, out, err = await run_trace(config, message_id, "--since", "10m", "--json")

    # Then trace says why, with the status, after one attempt
    assert code == 0, err
    [leg] = orjson.loads(out)["handlers"]
    assert (leg["state"], leg["reason"], leg["status"], leg["attempts"]) == (
        "dead-lettered", "HTTP 422", 422, 1
    )  # fmt: skip
    assert leg["behind"] is None
    assert len(http_handler.of(message_id)) == 1


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_dead_letter_replayed_and_delivered_is_listed_after_its_original_outcome(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given a webhook dead-lettered with 422
        config, since, message_id, name = await one_webhook(relay, http_handler, 422, invoice=6)
        await eventually(lambda: http_handler.of(message_id), timeout=20, what="tried")

        # When the handler is fixed and its dead letters replayed
        http_handler.default = 200

        async def replayed() -> bool:
            done = await relay_command("dlq", "replay", "--handler", name, "--config",
                                       str(config.path), timeout=30)  # fmt: skip
            assert done.returncode == 0, done.stderr
            return done.stdout.startswith("replay: 1 ")

        await eventually(replayed, timeout=20, interval=0.5, what="the dead letter replayed")

        async def listed() -> Journey | None:
            journey = await traced(config, message_id, since)
            return journey if journey.legs[0].replays else None

        journey = await eventually(listed, timeout=20, interval=0.5, what="the replay listed")
        code, out, err = await run_trace(config, message_id, "--since", "10m")

    # Then it is dead-lettered, and its replay, delivered, follows
    [leg] = journey.legs
    assert (leg.state, [(r.state, r.attempts, r.status) for r in leg.replays]) == (
        "dead-lettered", [("delivered", 1, 200)]
    )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].startswith(f"  {name}  dead-lettered  ")
    assert lines[3].startswith(f"  {' ' * len(name)}  replayed: delivered  "), lines


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_pending_webhook_is_in_its_partition_and_a_later_one_of_its_key_behind_it(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given a handler that answers 503 for ever, and two webhooks of invoice 7 with one of
        # invoice 8 between them
        http_handler.default = 503
        config = relay.config(billing_handler(http_handler))
        await relay.start(config)
        since = datetime.now(UTC)
        first = await post(config, new_id(), invoice=7)
        await post(config, new_id(), invoice=8)
        later = await post(config, new_id(), invoice=7)
        # (the first has been tried and failed twice; the later one never left its partition)
        await eventually(lambda: len(http_handler.of(first)) >= 2, timeout=20, what="2 tries")

        # When each is traced
        code, out, err = await run_trace(config, first, "--since", "10m", "--json")
        second = await traced(config, later, since)

    # Then both are pending in invoice 7's partition: the first behind none, the later behind 1
    name = config.settings.handlers[0].name
    partition = f"relay.{name}.{wire.bucket('invoice:7') % 4}"
    assert code == 0, err
    [leg] = orjson.loads(out)["handlers"]
    assert (leg["state"], leg["partition"], leg["behind"], leg["at"]) == (
        "pending", partition, 0, None
    )  # fmt: skip
    [waiting] = second.legs
    assert (waiting.state, waiting.partition, waiting.behind) == ("pending", partition, 1)
    assert http_handler.of(later) == []


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_a_webhook_two_handlers_bind_is_delivered_to_one_and_pending_at_the_other(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with HttpHandler() as down, Relay(tmp_path) as relay:
        # Given billing answering 200 and another handler of the same events answering 503
        down.default = 503
        config = relay.config(
            billing_handler(http_handler), {**billing_handler(down), "name": "other"}
        )
        await relay.start(config)
        since = datetime.now(UTC)
        message_id = await post(config, new_id(), invoice=3)
        billing, other = (h.name for h in config.settings.handlers)

        # When billing has delivered it
        async def one_delivered() -> Journey | None:
            journey = await traced(config, message_id, since)
            return journey if states(journey)[billing] == "delivered" else None

        await eventually(one_delivered, timeout=30, interval=0.5, what="billing delivered")
        code, out, err = await run_trace(config, message_id, "--since", "10m", "--json")

    # Then --json prints one object: the webhook, then billing delivered and the other pending
    assert code == 0, err
    found = orjson.loads(out)
    assert set(found) == {"id", "source", "event", "key", "accepted_at", "handlers"}
    assert (found["id"], found["source"], found["event"], found["key"]) == (
        message_id, "envoice", "envoice.paid", "invoice:3"
    )  # fmt: skip
    assert since <= datetime.fromisoformat(found["accepted_at"]) <= datetime.now(UTC)
    delivered, pending = found["handlers"]
    assert set(delivered) == {"name", "state", "at", "attempts", "status", "reason", "partition",
                              "behind", "replays"}  # fmt: skip
    assert (delivered["name"], delivered["state"], delivered["attempts"], delivered["status"]) == (
        billing, "delivered", 1, 200
    )  # fmt: skip
    assert pending == {
        "name": other, "state": "pending", "at": None, "attempts": None, "status": None,
        "reason": None, "partition": f"relay.{other}.{wire.bucket('invoice:3') % 4}",
        "behind": 0, "replays": [],
    }  # fmt: skip


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_trace_key_lists_the_last_n_webhooks_of_the_key_oldest_first(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given 4 webhooks of invoice 9 and one of invoice 10, all delivered
        config = relay.config(billing_handler(http_handler))
        await relay.start(config)
        ids = [await post(config, new_id(), invoice=9) for _ in range(2)]
        await post(config, new_id(), invoice=10)
        ids += [await post(config, new_id(), invoice=9) for _ in range(2)]
        await eventually(lambda: len(http_handler.accepted()) == 5, timeout=20, what="delivered")

        # When the last 3 of invoice 9 are traced (until the last one's record is there)
        async def last_three() -> list[dict[str, Any]] | None:
            code, out, err = await run_trace(config, "--key", "invoice:9", "--last", "3",
                                             "--since", "10m", "--json")  # fmt: skip
            assert code == 0, err
            found = [orjson.loads(line) for line in out.splitlines()]
            done = all(j["handlers"][0]["state"] == "delivered" for j in found)
            return found if done else None

        found = await eventually(last_three, timeout=30, interval=0.5, what="3 delivered")

    # Then it prints those three, one JSON object per line, oldest first
    assert [j["id"] for j in found] == ids[1:]
    assert {j["key"] for j in found} == {"invoice:9"}


@pytest.mark.rabbit
@pytest.mark.timeout(60)
async def test_an_id_not_in_the_archive_exits_1_saying_since_when_it_looked(
    tmp_path: Path,
) -> None:
    async with Relay(tmp_path) as relay:
        config = relay.config({"name": "h", "events": ["envoice.#"], "url": "http://127.0.0.1:9/"})
        await declare_topology(config.settings)
        before = datetime.now(UTC)

        code, out, err = await run_trace(config, "envoice:0", "--since", "2h")

    assert (code, out) == (1, "")
    [line] = err.splitlines()
    prefix = "relay: envoice:0 not found in the archive since "
    assert line.startswith(prefix), line
    since = datetime.fromisoformat(line.removeprefix(prefix).split(" ")[0])
    assert before - timedelta(hours=2, seconds=1) <= since <= datetime.now(UTC) - timedelta(hours=2)
