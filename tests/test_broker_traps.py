"""The RabbitMQ traps that touch ordering or loss (docs/RABBITMQ.md), each shown on the
real broker, and relay's handling of it shown to hold.

- requeue position: a nack with requeue sends a message to the back of a quorum queue; closing
  a channel returns its unacked deliveries to the head in order, whatever was acked in between,
  also when the consumer's process is killed: what relay relies on (it never nacks); messages
  taken with basic.get and returned together scramble a quorum queue, so dead letters are
  classic.
- aiormq runs a consumer callback per delivery, concurrently: relay queues each delivery per key
  before any await, and delivers each key one message at a time.
- cancelling a single-active consumer hands its queue over while it still holds deliveries:
  relay closes channels instead.
- consumer_timeout closes the channel of a delivery held too long: relay keeps order.
- a delivery received before a connection drop cannot be acked: the broker delivers it again.
- a consumer's prefetch is fixed when it starts: relay sizes a partition's window per channel.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import random
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue

from tests.conftest import AMQP_URL, MakeSettings, Publish, StartWorker
from tests.handlers_for_tests import Held, HttpHandler, Request
from tests.support import (
    ROOT,
    TcpProxy,
    events_per_invoice,
    eventually,
    handler,
    ids,
    logged,
    new_event,
    of_invoice,
    steady_stream,
)

pytestmark = pytest.mark.rabbit

MakeQueue = Callable[[str], Awaitable[AbstractQueue]]


@pytest.fixture
async def make_queue(connection: AbstractConnection) -> AsyncIterator[MakeQueue]:
    """`await make_queue("quorum" | "classic")`: a fresh durable queue, deleted after the test."""
    names: list[str] = []

    async def make(kind: str) -> AbstractQueue:
        names.append(f"relay.test-trap-{uuid.uuid4().hex[:8]}")
        channel = await connection.channel()
        return await channel.declare_queue(
            names[-1], durable=True, arguments={"x-queue-type": kind}
        )

    yield make
    for name in names:
        await (await connection.channel()).queue_delete(name)


async def fill(queue: AbstractQueue, count: int) -> None:
    """Publish the numbers 1..count to the queue, in order."""
    for number in range(1, count + 1):
        await queue.channel.default_exchange.publish(aio_pika.Message(b"%d" % number), queue.name)


async def take(queue: AbstractQueue, count: int) -> list[AbstractIncomingMessage]:
    """basic.get `count` messages without acking them."""
    return [await queue.get(no_ack=False) for _ in range(count)]


async def drain(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """basic.get (auto-ack) until the queue is empty."""
    drained = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        drained.append(message)
    return drained


def numbers(messages: list[AbstractIncomingMessage]) -> list[int]:
    return [int(m.body) for m in messages]


async def on_own_channel(connection: AbstractConnection, queue: AbstractQueue) -> AbstractQueue:
    """The same queue seen from a new channel (that the test can close)."""
    return await (await connection.channel()).get_queue(queue.name, ensure=False)


# --- requeue position -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "read_back"), [("quorum", [2, 3, 4, 5, 1]), ("classic", [1, 2, 3, 4, 5])]
)
async def test_a_nacked_message_goes_to_the_back_of_a_quorum_queue(
    kind: str, read_back: list[int], make_queue: MakeQueue
) -> None:
    # Given 1..5 in a queue without a delivery limit
    queue = await make_queue(kind)
    await fill(queue, 5)

    # When 1 is taken and nacked with requeue
    [first] = await take(queue, 1)
    await first.nack(requeue=True)

    # Then a quorum queue has put it at the back (the trap), a classic queue in its place
    assert numbers(await drain(queue)) == read_back


@pytest.mark.parametrize("kind", ["quorum", "classic"])
async def test_closing_a_channel_returns_its_one_unacked_message_to_the_head(
    kind: str, make_queue: MakeQueue, connection: AbstractConnection
) -> None:
    # Given 1..5 in a queue, and 1 taken unacked on a channel of its own
    queue = await make_queue(kind)
    await fill(queue, 5)
    taker = await on_own_channel(connection, queue)
    await take(taker, 1)

    # When that channel closes (as relay's worker does when it stops or loses the channel)
    await taker.channel.close()

    # Then 1 is back at the head, marked redelivered
    back = await drain(queue)
    assert numbers(back) == [1, 2, 3, 4, 5]
    assert [m.redelivered for m in back] == [True, False, False, False, False]
    if kind == "quorum":  # and counted: relay numbers its next attempt from this
        assert back[0].headers["x-delivery-count"] == 1


@pytest.mark.parametrize(("kind", "in_order"), [("quorum", False), ("classic", True)])
async def test_returning_many_unacked_messages_scrambles_a_quorum_queue(
    kind: str, in_order: bool, make_queue: MakeQueue, connection: AbstractConnection
) -> None:
    """Why `relay dlq` never reads with basic.get: it holds every dead letter unacked and gives
    them back by closing its channel (relay/ops/deadletters.py)."""
    # Given 300 messages, all taken unacked with basic.get on one channel
    queue = await make_queue(kind)
    await fill(queue, 300)
    taker = await on_own_channel(connection, queue)
    await take(taker, 300)

    # When the channel closes
    await taker.channel.close()

    # Then all 300 are back: in order in a classic queue, scrambled in a quorum queue
    back = numbers(await drain(queue))
    assert sorted(back) == list(range(1, 301))
    assert (back == list(range(1, 301))) is in_order


@pytest.mark.parametrize("kind", ["quorum", "classic"])
async def test_many_deliveries_held_by_a_consumer_come_back_in_order(
    kind: str, make_queue: MakeQueue, connection: AbstractConnection
) -> None:
    """How `relay dlq` reads a quorum dead-letter queue without reordering it
    (relay/ops/deadletters.py): through a consumer, some acked (replay, purge --id)."""
    # Given 300 messages, all delivered unacked to a consumer, two of them then acked
    queue = await make_queue(kind)
    await fill(queue, 300)
    taker = await on_own_channel(connection, queue)
    await taker.channel.set_qos(prefetch_count=300)
    arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await taker.consume(arrived.put)
    held = [await asyncio.wait_for(arrived.get(), timeout=10) for _ in range(300)]
    assert numbers(held) == list(range(1, 301))
    await held[0].ack()
    await held[150].ack()

    # When the channel closes
    await taker.channel.close()

    # Then the other 298 are back, in order, on either kind of queue
    assert numbers(await drain(queue)) == [n for n in range(1, 301) if n not in (1, 151)]


def test_relay_never_nacks_or_rejects() -> None:
    """relay returns what it cannot deliver by closing the channel, never by a nack or reject
    (which would send it to the back of its quorum queue). Its effect, a stopped worker leaving
    the message at the head, is shown by test_worker.py
    test_stop_during_backoff_returns_the_message_to_the_head_of_its_queue."""
    calls = {
        f"{path.name}:{node.lineno} {node.func.attr}"
        for path in sorted((ROOT / "relay").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"nack", "reject", "basic_nack", "basic_reject"}
    }
    assert not calls


# --- per-delivery tasks -----------------------------------------------------------------------


async def test_a_plain_consumer_with_prefetch_runs_its_callback_concurrently(
    make_queue: MakeQueue,
) -> None:
    # Given 5 messages and a plain aio-pika consumer with prefetch 5, each callback held
    queue = await make_queue("quorum")
    await fill(queue, 5)
    await queue.channel.set_qos(prefetch_count=5)
    in_flight: list[int] = []
    release = asyncio.Event()

    async def callback(message: AbstractIncomingMessage) -> None:
        in_flight.append(int(message.body))
        await release.wait()
        await message.ack()

    # When it consumes
    tag = await queue.consume(callback)
    try:
        # Then the callbacks of all five deliveries run at the same time (the trap)
        await eventually(lambda: len(in_flight) == 5, what="five callbacks in flight at once")
    finally:
        release.set()
        await queue.cancel(tag)


def overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals (start, end) that are open at the same moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    return max(itertools.accumulate(step for _, step in edges), default=0)


async def test_relay_delivers_many_keys_of_a_partition_at_once_and_each_key_one_at_a_time(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given a backlog of 12 invoices x 5 events over 3 partitions, and a handler taking 20 ms
    partitions = 3
    settings = make_settings(handlers=[handler({"url": http_handler.url}, partitions=partitions)])
    per_invoice = events_per_invoice(settings, invoices=12, each=5)
    await asyncio.gather(*(publish(settings, *events) for events in per_invoice.values()))
    http_handler.latency = 0.02

    # When the worker delivers them
    await start_worker(settings)
    total = sum(len(events) for events in per_invoice.values())
    await eventually(lambda: len(http_handler.accepted()) == total, what=f"{total} delivered")

    # Then no two requests of one invoice were ever in flight at the same time
    spans: dict[str, list[tuple[float, float]]] = {}
    for request in http_handler.requests:
        assert request.answered_at is not None
        spans.setdefault(request.key, []).append((request.at, request.answered_at))
    assert len(spans) == 12
    assert {key: overlap(s) for key, s in spans.items()} == dict.fromkeys(spans, 1)
    # while more invoices were in flight at once than there are partitions
    assert overlap([s for each in spans.values() for s in each]) > partitions
    # and each invoice in order
    for invoice, events in per_invoice.items():
        assert http_handler.accepted(f"invoice:{invoice}") == ids(events), f"invoice {invoice}"


# --- returned deliveries keep their order -------------------------------------------------------


def inversions(got: list[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(got) if a > b)


async def consume_all(queue: AbstractQueue, expected: set[int]) -> list[AbstractIncomingMessage]:
    """Consume (acking) until every number in `expected` arrived; all that came, in order."""
    got: list[AbstractIncomingMessage] = []
    done = asyncio.Event()
    missing = set(expected)

    async def on_message(message: AbstractIncomingMessage) -> None:
        got.append(message)  # before any await: arrival order
        missing.discard(int(message.body))
        await message.ack()
        if not missing:
            done.set()

    await queue.channel.set_qos(prefetch_count=100)
    tag = await queue.consume(on_message)
    await asyncio.wait_for(done.wait(), 30)
    await queue.cancel(tag)
    return got


@pytest.mark.parametrize("prefetch", [8, 100, 1000])
async def test_deliveries_returned_by_closing_the_channel_come_back_first_in_order(
    prefetch: int, make_queue: MakeQueue, connection: AbstractConnection
) -> None:
    """The fact relay's partitions rest on (docs/RABBITMQ.md): a consumer may hold a window of
    deliveries and ack any of them; closing its channel returns the rest first, in order. (An
    ack sent just before the close may not count: that message comes back too, in its place.)"""
    for trial in range(3):
        # Given 1..total in a quorum queue, a consumer holding `prefetch` of them unacked
        queue = await make_queue("quorum")
        total = prefetch + 50
        await fill(queue, total)
        taker = await on_own_channel(connection, queue)
        held, _ = await hold(taker, prefetch)
        # which acks a random 40% of them
        chosen = random.Random(trial).sample(held, k=prefetch * 2 // 5)
        for message in chosen:
            await message.ack()
        acked = {int(m.body) for m in chosen}

        # When its channel closes
        await taker.channel.close()

        # Then what was not acked comes back, in queue order, before what was never delivered
        unacked = [n for n in range(1, total + 1) if n not in acked]
        back = numbers(await consume_all(queue, set(unacked)))
        assert back == sorted(back), f"trial {trial}: {inversions(back)} inversion(s)"
        assert set(back) - acked == set(unacked)  # only acked ones may come again
        print(f"prefetch {prefetch} trial {trial}: {len(back) - len(unacked)} acked came again")


async def hold(queue: AbstractQueue, count: int) -> tuple[list[AbstractIncomingMessage], str]:
    """Consume `count` deliveries (prefetch `count`) and hold them unacked: the deliveries, and
    the consumer's tag (it stays)."""
    held: list[AbstractIncomingMessage] = []
    arrived = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        held.append(message)
        if len(held) == count:
            arrived.set()

    await queue.channel.set_qos(prefetch_count=count)
    tag = await queue.consume(on_message)
    await asyncio.wait_for(arrived.wait(), 30)
    return held, tag


KILLED_CONSUMER = """
import asyncio, random, sys, aio_pika
async def main():
    connection = await aio_pika.connect(sys.argv[1])
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=300)
    queue = await channel.get_queue(sys.argv[2], ensure=False)
    seen = 0
    async def on_message(message):
        nonlocal seen
        seen += 1
        n = seen
        if n <= 300 and random.random() < 0.4:
            print("acked", int(message.body), flush=True)  # maybe acked, when killed
            await message.ack()
        if n == 300:
            print("holding", flush=True)
    await queue.consume(on_message)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def test_deliveries_of_a_consumer_killed_with_sigkill_come_back_first_in_order(
    connection: AbstractConnection,
) -> None:
    # Given 1..400 in a quorum queue with single active consumer, as relay's partitions are,
    # and a consumer process holding its deliveries, 40% of the first 300 acked at random
    name = f"relay.test-trap-{uuid.uuid4().hex[:8]}"
    channel = await connection.channel()
    queue = await channel.declare_queue(
        name, durable=True, arguments={"x-queue-type": "quorum", "x-single-active-consumer": True}
    )
    try:
        await fill(queue, 400)
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_CONSUMER, AMQP_URL, name,
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        assert consumer.stdout is not None
        acked: set[int] = set()
        while (line := await asyncio.wait_for(consumer.stdout.readline(), 30)) != b"holding\n":
            acked.add(int(line.split()[1]))

        # When the process is killed with SIGKILL
        consumer.kill()
        await consumer.wait()

        # Then what it had not acked comes back, in queue order, marked redelivered first
        await eventually(
            lambda: _ready(connection, name), what="the killed consumer's deliveries returned"
        )
        unacked = set(range(1, 401)) - acked
        got = await consume_all(await on_own_channel(connection, queue), unacked)
    finally:
        await (await connection.channel()).queue_delete(name)
    back = numbers(got)
    assert back == sorted(back), f"{inversions(back)} inversion(s)"
    assert set(back) | acked == set(range(1, 401))
    flags = [bool(m.redelivered) for m in got]
    assert flags == sorted(flags, reverse=True)  # the returned ones, then the never delivered
    assert sum(flags) >= 300 - len(acked)


async def _ready(connection: AbstractConnection, name: str) -> int | None:
    """The queue's ready count, once its consumer is gone."""
    declared = await (await connection.channel()).declare_queue(name, passive=True)
    result = declared.declaration_result
    return result.message_count if result.consumer_count == 0 else None


# --- consumer_timeout -------------------------------------------------------------------------


async def rabbitmqctl_eval(expression: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "eval", expression,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode()
    return output.decode().strip()


@pytest.fixture
async def short_consumer_timeout() -> AsyncIterator[int]:
    """The broker's consumer_timeout at 5 s for channels opened during the test (a node-wide
    setting in 3.10), put back as the test found it whatever happens: its value, or unset."""
    milliseconds = 5000
    found = await rabbitmqctl_eval("application:get_env(rabbit, consumer_timeout).")
    assert found == "undefined" or re.fullmatch(r"\{ok,\d+\}", found), found
    restore = (
        "application:unset_env(rabbit, consumer_timeout)."
        if found == "undefined"
        else f"application:set_env(rabbit, consumer_timeout, {found[4:-1]})."
    )
    assert (
        await rabbitmqctl_eval(f"application:set_env(rabbit, consumer_timeout, {milliseconds}).")
        == "ok"
    )
    try:
        yield milliseconds
    finally:
        assert await rabbitmqctl_eval(restore) == "ok"
        assert await rabbitmqctl_eval("application:get_env(rabbit, consumer_timeout).") == found


def came_back_first(logs: list[dict[str, Any]], partition: str) -> bool:
    """Whether the broker cut the partition's channel for holding deliveries too long, and the
    message last tried before the cut was its key's first tried after it, its attempt count
    going on (not starting over)."""
    lines = [line for line in logs if line.get("partition") == partition]
    for i, line in enumerate(lines):
        if line["event"] != "partition channel lost" or "PRECONDITION_FAILED" not in line["error"]:
            continue
        before = [x for x in lines[:i] if x["event"] == "delivery failed"]
        if not before:
            continue
        held = before[-1]
        after = [
            x for x in lines[i:] if x["event"] == "delivery failed" and x["key"] == held["key"]
        ]
        if after:
            again = after[0]
            return bool(again["message_id"] == held["message_id"]) and (
                again["attempt"] == held["attempt"] + 1
            )
    return False


@pytest.mark.fault
@pytest.mark.timeout(200)
async def test_consumer_timeout_during_an_outage_loses_and_reorders_nothing(
    short_consumer_timeout: int,
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
    logs: list[dict[str, Any]],
) -> None:
    # Given a worker started under a 5 s consumer_timeout, its handler down (parked, probing
    # every 2 s: each partition holds its head message far longer than the timeout)
    settings = make_settings(
        handlers=[
            handler({"url": http_handler.url}, partitions=2, max_attempts=3,
                    backoff_initial_ms=100, backoff_max_ms=2000)
        ]
    )  # fmt: skip
    http_handler.default = 503
    await start_worker(settings)

    # When events for 4 invoices keep coming until the broker has cut every held delivery
    # (it checks about once a minute)
    async with steady_stream(publish, settings, invoices=4, per_second=2) as published:

        def all_cut() -> bool:
            """Each failing partition's channel was closed by the broker for holding its
            delivery too long, and the message came back first, at the head."""
            failing = {line["partition"] for line in logged(logs, "delivery failed")}
            return bool(failing) and all(came_back_first(logs, p) for p in failing)

        await eventually(all_cut, timeout=100, interval=1, what="consumer_timeout cuts")
    # and then the handler recovers
    http_handler.default = 200
    after = [new_event(settings, invoice) for invoice in range(1, 5)]
    await publish(settings, *after)

    # Then everything arrives, each invoice in publish order, nothing twice
    everything = published + after
    await eventually(
        lambda: set(http_handler.accepted()) >= set(ids(everything)),
        timeout=30,
        what=f"all {len(everything)} delivered",
    )
    for invoice in range(1, 5):
        expected = of_invoice(everything, invoice)
        assert expected
        assert http_handler.accepted(f"invoice:{invoice}") == expected, invoice
    duplicates = len(http_handler.accepted()) - len(everything)
    print(f"consumer_timeout: {len(everything)} published, {duplicates} duplicate(s)")
    assert duplicates == 0


# --- acks after a reconnect -------------------------------------------------------------------


async def test_a_delivery_that_cannot_be_acked_after_a_reconnect_is_delivered_again(
    http_handler: HttpHandler,
    make_settings: MakeSettings,
    start_worker: StartWorker,
    publish: Publish,
) -> None:
    # Given a worker connected through a proxy, and three events of one invoice, the handler
    # holding the first one's request
    proxy = TcpProxy()
    await proxy.start()
    settings = make_settings(handlers=[handler({"url": http_handler.url})], url=proxy.url())
    direct = replace(settings, broker=replace(settings.broker, url=AMQP_URL))
    events = [new_event(settings) for _ in range(3)]
    release = asyncio.Event()
    http_handler.plan(events[0].message_id, [Held(release)])
    worker = await start_worker(settings)
    try:
        await publish(direct, *events)
        await eventually(lambda: http_handler.requests, what="the first request")

        # When the connection is cut while the handler processes it, and the handler succeeds
        # (the worker's ack then has no channel to go on)
        await proxy.cut()
        await eventually(lambda: not worker.consuming, what="the worker noticing the cut")
        release.set()
        await eventually(lambda: http_handler.accepted(), what="the first request answered")
        # and the broker is reachable again
        await proxy.start()

        # Then the broker delivers the first event again, before the others: one duplicate
        await eventually(lambda: len(http_handler.accepted()) == 4, what="4 deliveries")
    finally:
        await worker.stop()
        await proxy.cut()
    assert http_handler.accepted() == ids([events[0], *events])
    # the second time as attempt 2, counted by the broker (x-delivery-count)
    again: list[Request] = http_handler.of(events[0].message_id)
    assert [r.attempt for r in again] == [1, 2]


# --- single active consumer ---------------------------------------------------------------------


async def test_cancelling_a_single_active_consumer_hands_the_queue_over_while_it_holds_deliveries(
    connection: AbstractConnection,
) -> None:
    """Why a stopping worker closes its partition channels and never cancels its consumers
    first (relay/worker/partition.py): the waiting consumer would get later messages while the
    cancelled one still holds earlier ones unacked, and deliver them first."""
    # Given 1..20 in a quorum queue with single active consumer, consumer A holding 1..10
    name = f"relay.test-trap-{uuid.uuid4().hex[:8]}"
    channel = await connection.channel()
    queue = await channel.declare_queue(
        name, durable=True, arguments={"x-queue-type": "quorum", "x-single-active-consumer": True}
    )
    try:
        await fill(queue, 20)
        first = await on_own_channel(connection, queue)
        held, tag = await hold(first, 10)
        # and consumer B waiting on another channel
        second = await on_own_channel(connection, queue)
        await second.channel.set_qos(prefetch_count=10)
        got: list[int] = []

        async def on_message(message: AbstractIncomingMessage) -> None:
            got.append(int(message.body))

        await second.consume(on_message)

        # When A cancels its consumer, still holding its deliveries
        await first.cancel(tag)

        # Then B is handed the queue at once and gets 11.. while 1..10 are still held by A
        await eventually(lambda: got, what="deliveries to the consumer waiting")
        assert got[0] == 11
        assert numbers(held) == list(range(1, 11))
    finally:
        await (await connection.channel()).queue_delete(name)


# --- prefetch ---------------------------------------------------------------------------------

ABSENCE_SECONDS = 1.0  # how long a consumer is watched to see that nothing more comes


async def test_a_later_basic_qos_changes_the_prefetch_of_later_consumers_only(
    make_queue: MakeQueue, connection: AbstractConnection
) -> None:
    """Why a partition's window is sized when its channel opens (relay/worker/keys.py): a
    consumer's prefetch cannot be raised or lowered while it consumes, only by a new channel."""
    # Given 1..40 in a quorum queue, a consumer holding 1..5 with prefetch 5
    queue = await make_queue("quorum")
    await fill(queue, 40)
    consumer = await on_own_channel(connection, queue)
    held, _ = await hold(consumer, 5)

    # When the channel's prefetch is raised to 20, and a second consumer starts on it
    await consumer.channel.set_qos(prefetch_count=20)
    other = await make_queue("quorum")
    await fill(other, 40)
    later, _ = await hold(await consumer.channel.get_queue(other.name, ensure=False), 20)

    # Then the later consumer holds 20, and the first still 5 and no more (watched a while)
    await asyncio.sleep(ABSENCE_SECONDS)
    assert (len(later), numbers(held)) == (20, [1, 2, 3, 4, 5])
