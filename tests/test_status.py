"""`relay status` on relay.unrouted: which of its messages configured handlers bind, counted
without moving them (relay/ops/status.py), and the topic matching that decides it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import orjson
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from relay import topology
from relay.ops import status
from relay.ops.status import (
    RUNBOOK,
    HandlerStatus,
    PartitionStatus,
    Status,
    Stranded,
    bound_by,
)
from relay.settings import HandlerSettings, Settings
from relay.wire import topic_matches
from tests.conftest import MakeSettings
from tests.support import eventually, queue_depth, relay_command

# (pattern, routing key, whether RabbitMQ routes the key to the pattern): the pure tests check
# `topic_matches` against it; test_rabbitmq_routes_as_topic_matches_says checks it on the
# broker, and `topic_matches` on every pattern and key of it.
CASES = [
    # exact
    ("envoice.paid", "envoice.paid", True),
    ("envoice.paid", "envoice.created", False),
    ("envoice.paid", "envoice.paid.late", False),
    ("envoice.paid", "envoice", False),
    # `*`: exactly one word
    ("envoice.*", "envoice.paid", True),
    ("envoice.*", "envoice", False),
    ("envoice.*", "envoice.paid.late", False),
    ("*.paid", "github.paid", True),
    ("*", "paid", True),
    ("*", "", False),
    ("*.*", "envoice.paid", True),
    # `#` alone: anything, no words too
    ("#", "envoice.paid", True),
    ("#", "envoice", True),
    ("#", "", True),
    # `#` at the end
    ("envoice.#", "envoice", True),
    ("envoice.#", "envoice.paid", True),
    ("envoice.#", "envoice.paid.late", True),
    ("envoice.#", "github.push", False),
    # `#` at the start
    ("#.paid", "paid", True),
    ("#.paid", "envoice.paid", True),
    ("#.paid", "a.b.paid", True),
    ("#.paid", "envoice.paid.late", False),
    # `#` in the middle
    ("envoice.#.paid", "envoice.paid", True),
    ("envoice.#.paid", "envoice.x.paid", True),
    ("envoice.#.paid", "envoice.x.y.paid", True),
    ("envoice.#.paid", "envoice.x.y", False),
    ("github.#.*", "github", False),
    ("github.#.*", "github.push", True),
    ("#.#", "a.b.c", True),
    # empty words are words
    ("envoice.*", "envoice.", True),
    ("envoice.#", "envoice.", True),
    ("*.paid", ".paid", True),
    ("envoice.*.paid", "envoice..paid", True),
    ("envoice.paid", "envoice..paid", False),
    ("envoice..paid", "envoice..paid", True),
    ("envoice.paid", "envoice.paid.", False),
    # a word is matched whole: `*` inside one is no wildcard
    ("envoice.new_*", "envoice.new_payment", False),
    ("envoice.new_*", "envoice.new_*", True),
]


@pytest.mark.parametrize(("pattern", "key", "routed"), CASES)
def test_topic_matches_matches_as_rabbitmq_topic_routing_does(
    pattern: str, key: str, routed: bool
) -> None:
    assert topic_matches(pattern, key) is routed


def test_topic_matches_handles_many_hashes_quickly() -> None:
    pattern = ".".join(["#"] * 40 + ["z"])

    assert topic_matches(pattern, ".".join(["a"] * 200)) is False
    assert topic_matches(pattern, ".".join(["a"] * 200 + ["z"])) is True


def test_bound_by_counts_each_key_for_every_handler_binding_it_in_config_order() -> None:
    handlers = [
        HandlerSettings(name="every", events=("envoice.#",), bindings=("envoice.#",)),
        HandlerSettings(name="quiet", events=("github.push",), bindings=("github.push",)),
        HandlerSettings(
            name="paid", events=("envoice.paid",), bindings=("envoice.paid", "envoice.void")
        ),
    ]
    keys = ["envoice.paid", "envoice.created", "stripe.charge", "envoice.void", "envoice.paid"]

    assert list(bound_by(handlers, keys).items()) == [("every", 4), ("paid", 3)]


def test_status_text_warns_with_counts_and_says_at_least_when_it_read_only_the_first() -> None:
    whole = Status([], 5, Stranded(queued=5, read=5, handlers={"billing": 3})).render()
    first = Status(
        [], 9000, Stranded(queued=9000, read=2000, complete=False, handlers={"b": 3})
    ).render()
    nothing = Status([], 5, Stranded(queued=5, read=5)).render()

    assert "stranded here:" in whole
    assert whole.splitlines()[-3].split() == ["billing", "3"]
    assert RUNBOOK in whole.splitlines()[-1]
    assert "stranded here among the first 2000 read:" in first
    assert first.splitlines()[-3].split() == ["b", "at", "least", "3"]
    assert nothing.splitlines()[-1] == "relay.unrouted: 5 message(s)"


@pytest.mark.rabbit
def test_status_shows_the_handlers_rate_as_the_sum_of_its_partitions_shares() -> None:
    # Given a handler of 4 partitions: 3 held by a worker at 40/s, 1 by a worker backed off to 20
    def partition(i: int, rate: float | None) -> PartitionStatus:
        return PartitionStatus(f"relay.b.{i}", 0, 0, 2, state="live", rate=rate)

    limited = HandlerStatus("b", [partition(0, 40.0), *(partition(i, 20.0) for i in (1, 2, 3))], 0)
    unlimited = HandlerStatus("u", [partition(0, 40.0), partition(1, None)], 0)
    # Then its rate is 40/4 + 3 * 20/4 = 25/s; with a partition unlimited there is no limit
    text = Status([limited, unlimited], 0).render().splitlines()
    assert limited.rate == 25.0
    assert text[0].split()[-1] == "rate/s"
    assert text[1].split()[-1] == "25.0"
    assert unlimited.rate is None
    assert text[6].split()[-1] == "-"


async def test_rabbitmq_routes_as_topic_matches_says(channel: AbstractChannel) -> None:
    # Given a topic exchange with a queue bound by each pattern (the test's own, gone after it)
    name = f"test-topic-{uuid.uuid4().hex[:8]}"
    exchange = await channel.declare_exchange(name, "topic", auto_delete=True)
    patterns = list(dict.fromkeys(pattern for pattern, _, _ in CASES))
    queues: dict[str, AbstractQueue] = {}
    for pattern in patterns:
        queues[pattern] = await channel.declare_queue(exclusive=True)
        await queues[pattern].bind(exchange, pattern)
    # When every key is published once, each confirmed
    keys = list(dict.fromkeys(key for _, key, _ in CASES))
    for i, key in enumerate(keys):
        await exchange.publish(aio_pika.Message(b"", message_id=str(i)), routing_key=key)

    # Then each pattern's queue got the keys the table routes to it, as `topic_matches` says
    async def routed(pattern: str) -> set[str]:
        got = set()
        while (message := await queues[pattern].get(fail=False, no_ack=True)) is not None:
            got.add(keys[int(message.message_id or "")])
        return got

    for pattern in patterns:
        got = await routed(pattern)
        tested = {k for p, k, _ in CASES if p == pattern}
        assert got & tested == {k for p, k, routes in CASES if p == pattern and routes}, pattern
        assert got == {k for k in keys if topic_matches(pattern, k)}, pattern
    for queue in queues.values():
        await queue.delete()
    await exchange.delete()


# --- relay status on relay.unrouted -----------------------------------------------------------
#
# Messages a closing channel gives back take milliseconds to count as ready again: each read
# below waits for that before it returns, as `relay status` does.


async def held(channel: AbstractChannel) -> list[AbstractIncomingMessage]:
    """The messages relay.unrouted counts ready, held unacked on `channel`, in queue order."""
    queue = await channel.declare_queue(topology.UNROUTED, passive=True)
    count = queue.declaration_result.message_count or 0
    found: list[AbstractIncomingMessage] = []
    if count:
        await channel.set_qos(prefetch_count=count)
        arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(arrived.put)
        while len(found) < count:
            found.append(await asyncio.wait_for(arrived.get(), 10))
    return sorted(found, key=lambda m: m.delivery_tag or 0)


async def given_back(connection: AbstractConnection, depth: int) -> None:
    """Wait until relay.unrouted counts at least `depth` messages ready."""
    channel = await connection.channel()

    async def ready() -> bool:
        return await queue_depth(channel, topology.UNROUTED) >= depth

    await eventually(ready, what=f"{depth} messages ready in relay.unrouted")
    await channel.close()


async def unrouted_ids(connection: AbstractConnection) -> list[str]:
    """The message ids in relay.unrouted, in queue order; all held at once, and given back."""
    channel = await connection.channel()
    try:
        ids = [m.message_id or "" for m in await held(channel)]
    finally:
        await channel.close()
    await given_back(connection, len(ids))
    return ids


@pytest.fixture
async def removed_after(connection: AbstractConnection) -> AsyncIterator[list[str]]:
    """Ids of the messages the test put in relay.unrouted: taken out after it, the others left in
    place."""
    ours: list[str] = []
    yield ours
    if not ours:
        return
    channel = await connection.channel()
    try:
        messages = await held(channel)
        for message in messages:
            if message.message_id in ours:
                await message.ack()
    finally:
        await channel.close()
    assert {m.message_id for m in messages} >= set(ours), "the test's messages were not all there"
    await given_back(connection, len(messages) - len(ours))


async def strand(
    make_settings: MakeSettings, connection: AbstractConnection, ours: list[str]
) -> Settings:
    """Handlers `paid` (of `paid`), `every` (every event) and `quiet` (`void`) of a source of the
    test's own, whose topology was never declared; four webhooks published to the exchange land
    in relay.unrouted: two `paid`, one `created`, one of a source nobody binds. Their ids are
    appended to `ours`, in order."""
    source = f"s{uuid.uuid4().hex[:8]}"
    target = {"url": "http://127.0.0.1:9/"}
    settings = make_settings(
        archive={"enabled": False},  # with the archive, nothing would reach relay.unrouted
        source={"name": source, "path": f"/webhooks/{source}"},
        handlers=[
            {"name": "paid", "events": [f"{source}.paid"], **target},
            {"name": "every", "events": [f"{source}.#"], **target},
            {"name": "quiet", "events": [f"{source}.void"], **target},
        ],
    )
    channel = await connection.channel(publisher_confirms=True)
    await topology.declare(channel, topology.ingress(settings))
    exchange = await channel.get_exchange(settings.broker.exchange)
    keys = [f"{source}.paid", f"{source}.created", f"{source}.paid", f"x{source}.paid"]
    for i, key in enumerate(keys):
        message_id = f"{source}:{i}"
        await exchange.publish(aio_pika.Message(b"{}", message_id=message_id), routing_key=key)
        ours.append(message_id)
    await channel.close()
    return settings


@pytest.mark.rabbit
async def test_status_counts_per_handler_what_relay_unrouted_holds_for_it_and_moves_nothing(
    make_settings: MakeSettings, connection: AbstractConnection, removed_after: list[str]
) -> None:
    # Given handlers whose topology was never declared, and webhooks for them (and one no handler
    # binds) stranded in relay.unrouted, behind whatever it held already
    settings = await strand(make_settings, connection, removed_after)
    paid, every, _ = (h.name for h in settings.handlers)
    before = await unrouted_ids(connection)
    # When `relay status` runs
    config = make_settings.config_file(settings)
    as_json = await relay_command("status", "--json", "--config", config)
    as_text = await relay_command("status", "--config", config)

    # Then it counts per handler the messages it binds, and names no handler that has none
    assert as_json.returncode == 0, as_json.stderr
    found = orjson.loads(as_json.stdout)
    stranded = found["stranded"]
    assert (stranded["complete"], stranded["not_read"]) == (True, ""), stranded
    assert found["unrouted"] == stranded["queued"] == stranded["read"] >= len(before)
    assert stranded["handlers"] == {paid: 2, every: 3}
    # and says so in its text, with where to read what to do
    assert as_text.returncode == 0, as_text.stderr
    lines = as_text.lines()
    [warning] = [i for i, line in enumerate(lines) if "WARNING" in line and "stranded" in line]
    assert [line.split() for line in lines[warning + 1 : warning + 3]] == [
        [paid, "2"],
        [every, "3"],
    ]
    assert RUNBOOK in lines[warning + 4], as_text.stdout
    # and relay.unrouted holds what it held, in the same order
    after = await unrouted_ids(connection)
    assert after[: len(before)] == before


@pytest.mark.rabbit
async def test_status_reads_at_most_its_bound_and_says_at_least(
    make_settings: MakeSettings,
    connection: AbstractConnection,
    removed_after: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given webhooks stranded in relay.unrouted behind what it held already (read whole first:
    # given back, it stays ahead of them)
    earlier = await unrouted_ids(connection)
    settings = await strand(make_settings, connection, removed_after)
    paid, every, _ = (h.name for h in settings.handlers)
    # When status may read no further than the first two of them
    bound = len(earlier) + 2
    monkeypatch.setattr(status, "UNROUTED_READ_MAX", bound)
    found = await status.status(settings)

    # Then it counts among those, says it read only the first, and moved nothing
    assert (found.stranded.read, found.stranded.complete) == (bound, False)
    assert found.stranded.handlers == {paid: 1, every: 2}
    assert f"among the first {bound} read" in found.render()
    after = await unrouted_ids(connection)
    assert after[: len(earlier) + len(removed_after)] == earlier + removed_after


@pytest.mark.rabbit
async def test_a_consumer_holding_fewer_than_were_given_back_before_reorders_a_quorum_queue(
    channel: AbstractChannel, connection: AbstractConnection
) -> None:
    # Given a quorum queue of 20 messages, all delivered to a consumer and given back (its
    # channel closed): they wait in the queue's list of returned messages
    queue = await channel.declare_queue(
        f"test-returns-{uuid.uuid4().hex[:8]}", durable=True, arguments=topology.QUORUM
    )
    ids = [str(i) for i in range(20)]
    for message_id in ids:
        await channel.default_exchange.publish(
            aio_pika.Message(b"", message_id=message_id), queue.name
        )

    async def read(count: int) -> list[str]:
        await eventually(lambda: _ready(channel, queue.name, len(ids)), what="all ready")
        reader = await connection.channel()
        await reader.set_qos(prefetch_count=count)
        arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await (await reader.get_queue(queue.name)).consume(arrived.put)
        got = [(await asyncio.wait_for(arrived.get(), 10)).message_id or "" for _ in range(count)]
        await reader.close()
        return got

    assert await read(20) == ids
    # When a consumer holds only the first 14 and its channel closes
    assert await read(14) == ids[:14]

    # Then those 14 went back behind the other 6: later returns queue after earlier ones. (So
    # `relay status` holds at least as many as it held before, the same bound every time.)
    assert await read(20) == ids[14:] + ids[:14]
    await queue.delete(if_unused=False, if_empty=False)


async def _ready(channel: AbstractChannel, name: str, depth: int) -> bool:
    return await queue_depth(channel, name) == depth
