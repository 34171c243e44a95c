"""Dead letters through the command line: `relay dlq list|replay|purge --handler NAME`, against
an in-process worker and a real HTTP handler."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import ChannelPreconditionFailed

from relay import wire
from relay.broker import queue_exists
from relay.providers import Event
from tests.conftest import MakeSettings, Publish, StartWorker
from tests.handlers_for_tests import HttpHandler
from tests.support import (
    ROOT,
    Completed,
    declare_topology,
    depth_is,
    events_per_invoice,
    eventually,
    handler,
    ids,
    logged,
    new_event,
    of_key,
    queue_depth,
    relay_command,
)

pytestmark = pytest.mark.rabbit

CLOSED_BROKER = "amqp://guest:guest@127.0.0.1:1/"
LISTED = re.compile(
    r"(?P<id>\S+)  (?P<key>\S+)  (?P<event>\S+)  attempts=(?P<attempts>\d+)  "
    r"age=(?P<age>\d+)s  (?P<reason>.+)"
)


@dataclass(frozen=True)
class DeadLetters:
    """A handler's dead-letter queue, and the `relay dlq` command for it."""

    config: str
    handler: str
    queue: str

    async def command(
        self, action: str, *args: str, env: dict[str, str] | None = None
    ) -> Completed:
        return await relay_command(
            "dlq", action, "--handler", self.handler, "--config", self.config, *args, env=env
        )

    async def listed(self, *args: str) -> list[dict[str, Any]]:
        """`relay dlq list --json ARGS`, one object per dead letter."""
        result = await self.command("list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [orjson.loads(line) for line in result.lines()]

    async def listed_ids(self) -> list[str]:
        return [letter["id"] for letter in await self.listed()]


@dataclass(frozen=True)
class Rejected:
    """Events a handler rejected, in publish order, now its dead letters."""

    events: list[Event]
    dead: DeadLetters
    downstream: HttpHandler


@pytest.fixture
async def rejected(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    channel: AbstractChannel,
) -> Rejected:
    """Three events of invoice 7 and two of invoice 8 (interleaved), rejected with 422 by a
    handler with 2 partitions, so dead-lettered; the handler accepts everything from now on."""
    settings = make_settings(handlers=[handler({"url": http_handler.url}, partitions=2)])
    events = [new_event(settings, invoice) for invoice in (7, 8, 7, 8, 7)]
    http_handler.default = 422
    await start_worker(settings)
    await publish(settings, *events)
    dlq = settings.handlers[0].dead_letter_queue
    await eventually(lambda: depth_is(channel, dlq, 5), what="5 dead letters")
    http_handler.default = 200
    dead = DeadLetters(make_settings.config_file(settings), settings.handlers[0].name, dlq)
    return Rejected(events, dead, http_handler)


def without_age(letters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Listed dead letters without their age, which grows between two listings."""
    return [{k: v for k, v in letter.items() if k != "age"} for letter in letters]


def per_key_order_kept(listed: list[str], events: list[Event]) -> bool:
    """Whether `listed` holds exactly the events, each key's in publish order."""
    keys = {e.key for e in events}
    listed_events = [e for i in listed for e in events if e.message_id == i]
    return sorted(listed) == sorted(ids(events)) and all(
        of_key(listed_events, key) == of_key(events, key) for key in keys
    )


# --- list -------------------------------------------------------------------------------------


async def test_list_shows_each_dead_letter_and_leaves_them_in_place(
    rejected: Rejected, channel: AbstractChannel
) -> None:
    dead = rejected.dead

    text = await dead.command("list")

    # one line each: id, key, event, attempts, age, reason; then the count
    assert text.returncode == 0, text.stderr
    *lines, total = text.lines()
    assert total == "5 dead letter(s)"
    rows = [LISTED.fullmatch(line) for line in lines]
    assert all(rows), lines
    listed = [row["id"] for row in rows if row]
    assert per_key_order_kept(listed, rejected.events)
    key_of = {e.message_id: e.key for e in rejected.events}
    for row in filter(None, rows):
        assert (row["key"], row["event"], row["attempts"]) == (key_of[row["id"]], "paid", "1")
        assert row["reason"] == "HTTP 422"
        assert int(row["age"]) < 60
    # as JSON, the same dead letters in the same order, with status, last attempt and age
    as_json = await dead.listed()
    assert [letter["id"] for letter in as_json] == listed
    for letter in as_json:
        assert letter["key"] == key_of[letter["id"]]
        assert (letter["event"], letter["reason"], letter["status"]) == ("paid", "HTTP 422", 422)
        assert letter["attempts"] == 1
        assert datetime.fromisoformat(letter["last_attempt"]).tzinfo is not None
        assert isinstance(letter["age"], int)
        assert 0 <= letter["age"] < 60  # seconds
    # listing again gives the same; nothing was taken out of the queue
    assert without_age(await dead.listed()) == without_age(as_json)
    assert await queue_depth(channel, dead.queue) == 5
    assert not rejected.downstream.accepted()


async def test_list_of_ids_shows_only_those_in_queue_order(rejected: Rejected) -> None:
    dead = rejected.dead
    everything = await dead.listed_ids()
    first, last = everything[0], everything[-1]

    text = await dead.command("list", "--id", last, "--id", first)

    assert text.returncode == 0, text.stderr
    *lines, total = text.lines()
    assert total == "2 dead letter(s)"
    rows = [LISTED.fullmatch(line) for line in lines]
    assert [row["id"] for row in rows if row] == [first, last]
    assert [letter["id"] for letter in await dead.listed("--id", last)] == [last]
    # the others are still there, in place
    assert await dead.listed_ids() == everything


async def test_list_of_an_unknown_id_fails_naming_it(rejected: Rejected) -> None:
    dead = rejected.dead
    known = rejected.events[0].message_id

    result = await dead.command("list", "--id", known, "--id", "envoice:0")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"relay: dead letter 'envoice:0' not found in {dead.queue}"
    ]


async def test_list_into_a_closed_pipe_exits_0_quietly(
    make_settings: MakeSettings, channel: AbstractChannel
) -> None:
    # Given a handler with more dead letters than a pipe holds
    settings = make_settings(handlers=[handler({"url": "http://127.0.0.1:1/"})])
    await declare_topology(settings)
    name, dlq = settings.handlers[0].name, settings.handlers[0].dead_letter_queue
    count = 2000

    def dead_letter(i: int) -> aio_pika.Message:
        original = aio_pika.Message(
            b"{}", message_id=f"envoice:{i}",
            headers={wire.KEY_HEADER: "invoice:7", wire.EVENT_HEADER: "paid"},
        )  # fmt: skip
        reason = "HTTP 422 " + "x" * 100
        return wire.dead_letter(b"{}", original, handler=name, reason=reason, status=422,
                                attempts=1, first_attempt=datetime.now(UTC))  # fmt: skip

    await asyncio.gather(*(channel.default_exchange.publish(dead_letter(i), dlq)
                           for i in range(count)))  # fmt: skip
    await eventually(lambda: depth_is(channel, dlq, count), what=f"{count} dead letters")
    config = make_settings.config_file(settings)

    # When `relay dlq list --handler NAME | head -1` reads one line and closes the pipe
    def first_line_then_close() -> tuple[str, int, str]:
        command = [sys.executable, "-m", "relay", "dlq", "list", "--handler", name,
                   "--limit", str(count), "--config", config]  # fmt: skip
        with subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as process:
            assert process.stdout is not None
            assert process.stderr is not None
            first = process.stdout.readline()
            process.stdout.close()
            stderr = process.stderr.read()
            return first, process.wait(timeout=60), stderr

    first, returncode, stderr = await asyncio.to_thread(first_line_then_close)

    # Then it exits 0, saying nothing, and the dead letters stay in place
    assert LISTED.fullmatch(first.rstrip("\n")), first
    assert (returncode, stderr) == (0, "")
    await eventually(lambda: depth_is(channel, dlq, count), what=f"{count} dead letters back")


# --- replay -----------------------------------------------------------------------------------


async def test_replay_delivers_the_dead_letters_again_in_acceptance_order(
    rejected: Rejected, channel: AbstractChannel
) -> None:
    dead = rejected.dead

    result = await dead.command("replay")

    assert result.returncode == 0, result.stderr
    assert result.lines() == [f"replay: 5 dead letter(s) of {dead.handler}"]
    downstream = rejected.downstream
    await eventually(lambda: len(downstream.accepted()) >= 5, what="5 replayed deliveries")
    # the three of invoice 7 (and the two of invoice 8) in the order relay accepted them
    for key in ("invoice:7", "invoice:8"):
        assert downstream.accepted(key) == of_key(rejected.events, key), key
    assert len(downstream.accepted()) == 5
    assert await queue_depth(channel, dead.queue) == 0


async def test_replay_of_one_id_leaves_the_others_in_place_and_in_order(
    rejected: Rejected,
) -> None:
    dead = rejected.dead
    before = await dead.listed_ids()
    chosen = rejected.events[2].message_id  # the second of invoice 7

    result = await dead.command("replay", "--id", chosen)

    assert result.returncode == 0, result.stderr
    assert result.lines() == [f"replay: 1 dead letter(s) of {dead.handler}"]
    await eventually(lambda: rejected.downstream.accepted(), what="the replayed delivery")
    assert rejected.downstream.accepted() == [chosen]
    assert await dead.listed_ids() == [i for i in before if i != chosen]


@pytest.mark.parametrize("action", [["replay"], ["purge", "--yes"]], ids=" ".join)
async def test_an_unknown_id_fails_naming_it_and_changes_nothing(
    action: list[str], rejected: Rejected
) -> None:
    dead = rejected.dead
    before = await dead.listed()
    known = rejected.events[0].message_id

    # an unknown id alone, or with a known one: which is left alone too
    for given in (["envoice:0"], [known, "envoice:0"]):
        result = await dead.command(*action, *(a for i in given for a in ("--id", i)))

        assert result.returncode == 1, given
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            f"relay: dead letter 'envoice:0' not found in {dead.queue}"
        ]
    assert without_age(await dead.listed()) == without_age(before)
    assert not rejected.downstream.accepted()


async def test_replayed_messages_go_only_to_their_handler_and_to_the_same_partition(
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    channel: AbstractChannel,
    logs: list[dict[str, Any]],
) -> None:
    async with HttpHandler() as rejecting, HttpHandler() as accepting:
        # Given two handlers of the same events with 3 partitions each; one rejected all 12
        settings = make_settings(
            handlers=[
                handler({"url": rejecting.url}, name="rejecting", partitions=3),
                handler({"url": accepting.url}, name="accepting", partitions=3),
            ]
        )
        rejecting.default = 422
        await start_worker(settings)
        per_invoice = events_per_invoice(settings, invoices=4, each=3)
        events = [e for invoice_events in per_invoice.values() for e in invoice_events]
        await publish(settings, *events)
        dlq = settings.handlers[0].dead_letter_queue
        await eventually(lambda: depth_is(channel, dlq, 12), what="12 dead letters")
        await eventually(lambda: len(accepting.accepted()) == 12, what="12 accepted")

        # When it accepts again and its dead letters are replayed
        rejecting.default = 200
        name = settings.handlers[0].name
        config = make_settings.config_file(settings)
        replayed = await DeadLetters(config, name, dlq).command("replay")
        assert replayed.returncode == 0, replayed.stderr
        # and then one more event per invoice is published
        last = [new_event(settings, invoice) for invoice in per_invoice]
        await publish(settings, *last)

        # Then the replaying handler gets each invoice's events in order, then the last one
        await eventually(lambda: len(rejecting.accepted()) == 16, what="16 to the replaying")
        await eventually(lambda: len(accepting.accepted()) == 16, what="16 to the other")
        for invoice, invoice_events in per_invoice.items():
            key = f"invoice:{invoice}"
            assert rejecting.accepted(key) == ids(invoice_events) + of_key(last, key), key
            # while the other handler got each event once: none of the replayed ones again
            assert accepting.accepted(key) == ids(invoice_events) + of_key(last, key), key

    # and each replayed event was delivered from the partition it was dead-lettered from
    def partitions(event: str) -> dict[str, str]:
        return {
            line["message_id"]: line["partition"]
            for line in logged(logs, event)
            if line["handler"] == name
        }

    dead_lettered_from, delivered_from = partitions("dead-lettered"), partitions("delivered")
    assert {i: delivered_from[i] for i in ids(events)} == dead_lettered_from
    assert len(set(dead_lettered_from.values())) > 1  # the events were spread over partitions


# --- purge ------------------------------------------------------------------------------------


async def test_purge_asks_for_confirmation_and_removes_what_it_is_told(
    rejected: Rejected, channel: AbstractChannel
) -> None:
    dead = rejected.dead
    before = await dead.listed_ids()

    # Without an answer to its question (no stdin), purge is cancelled and removes nothing
    cancelled = await dead.command("purge")
    assert cancelled.returncode == 1
    assert "Purge ALL dead letters" in cancelled.stdout
    assert cancelled.stderr.splitlines() == ["relay: purge cancelled"]
    assert await dead.listed_ids() == before

    # With --yes and --id, only that one goes
    chosen = rejected.events[2].message_id
    one = await dead.command("purge", "--id", chosen, "--yes")
    assert one.returncode == 0, one.stderr
    assert one.lines() == [f"purge: 1 dead letter(s) of {dead.handler}"]
    assert await dead.listed_ids() == [i for i in before if i != chosen]

    # With --yes alone, all go, and none is delivered
    rest = await dead.command("purge", "--yes")
    assert rest.returncode == 0, rest.stderr
    assert rest.lines() == [f"purge: 4 dead letter(s) of {dead.handler}"]
    assert await queue_depth(channel, dead.queue) == 0
    assert not rejected.downstream.accepted()


# --- failures ---------------------------------------------------------------------------------

ACTIONS = [["list"], ["replay"], ["purge", "--yes"]]


@pytest.mark.parametrize("action", ACTIONS, ids=" ".join)
async def test_an_unknown_handler_exits_2(action: list[str], make_settings: MakeSettings) -> None:
    settings = make_settings(handlers=[handler({"url": "http://127.0.0.1:1/"})])
    dead = DeadLetters(make_settings.config_file(settings), "no-such-handler", "")

    result = await dead.command(*action)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"relay: config error: {dead.config}: no handler named 'no-such-handler' in the config"
    ]


@pytest.mark.parametrize("action", ACTIONS, ids=" ".join)
async def test_an_unreachable_broker_exits_3(
    action: list[str], make_settings: MakeSettings
) -> None:
    settings = make_settings(handlers=[handler({"url": "http://127.0.0.1:1/"})])
    dead = DeadLetters(make_settings.config_file(settings), settings.handlers[0].name, "")

    result = await dead.command(*action, env={"RELAY_AMQP_URL": CLOSED_BROKER})

    assert result.returncode == 3
    [line] = result.stderr.splitlines()
    assert line.startswith("relay: broker unreachable")
    assert "guest:guest" not in result.stderr + result.stdout


@pytest.mark.parametrize("action", ACTIONS, ids=" ".join)
async def test_a_dead_letter_queue_never_declared_is_named_not_the_broker(
    action: list[str], make_settings: MakeSettings
) -> None:
    # Given a handler in the config that nothing has declared on the broker yet
    settings = make_settings(handlers=[handler({"url": "http://127.0.0.1:1/"})])
    name, dlq = settings.handlers[0].name, settings.handlers[0].dead_letter_queue
    dead = DeadLetters(make_settings.config_file(settings), name, dlq)

    result = await dead.command(*action)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"relay: {dlq} does not exist: run `relay topology declare`, or start a worker of "
        f"handler {name!r}"
    ]


# --- a classic dead-letter queue of an older relay --------------------------------------------


async def test_topology_declare_converts_an_older_classic_dead_letter_queue_in_order(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    channel: AbstractChannel,
    connection: AbstractConnection,
) -> None:
    # Given a handler whose dead-letter queue an older relay declared classic
    settings = make_settings(handlers=[handler({"url": http_handler.url}, partitions=2)])
    dlq = settings.handlers[0].dead_letter_queue
    await publish(settings)  # declares the topology of today's relay
    await channel.queue_delete(dlq)
    await channel.declare_queue(dlq, durable=True)  # classic
    config = make_settings.config_file(settings)
    dead = DeadLetters(config, settings.handlers[0].name, dlq)
    # and a worker of today's relay dead-lettering 5 events into it
    http_handler.default = 422
    worker = await start_worker(settings)
    events = [new_event(settings, invoice) for invoice in (7, 8, 7, 8, 7)]
    await publish(settings, *events)
    await eventually(lambda: depth_is(channel, dlq, 5), what="5 dead letters")
    before = await dead.listed_ids()
    assert per_key_order_kept(before, events)

    # When `relay topology declare` runs while the worker consumes the handler's partitions
    busy = await relay_command("topology", "declare", "--config", config)

    # Then it leaves the queue as it is and says why
    assert busy.returncode == 0, busy.stderr
    assert f"= queue {dlq} stays as it is until it can become a quorum queue" in busy.stdout
    assert await is_quorum(connection, dlq) is False

    # When it runs again with the worker stopped
    await worker.stop()
    converted = await relay_command("topology", "declare", "--config", config)

    # Then the queue is a quorum queue holding the same dead letters in the same order
    assert converted.returncode == 0, converted.stderr
    assert f"~ queue {dlq} becomes a quorum queue, its messages moved in order" in converted.stdout
    assert await is_quorum(connection, dlq) is True
    assert await dead.listed_ids() == before
    assert not await queue_exists(connection, dlq + ".converting")
    # and a third run has nothing left to do for it
    again = await relay_command("topology", "declare", "--config", config)
    assert dlq not in again.stdout


async def is_quorum(connection: AbstractConnection, name: str) -> bool:
    """Whether the queue is a quorum queue: declaring it as one is refused otherwise."""
    probe = await connection.channel()
    try:
        await probe.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    except ChannelPreconditionFailed:
        return False
    await probe.close()
    return True
