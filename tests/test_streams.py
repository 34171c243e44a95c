"""The RabbitMQ stream facts relay's archive (a stream bound with "#" to relay.activities) and
its outcome log rest on, each shown on the real broker (3.10.8, AMQP 0.9.1 through aio-pika).

- A stream bound with "#" gets every message published to the exchange, in publish order, and
  keeps it after a consumer read and acked it.
- Such a stream takes what would otherwise go to the exchange's alternate exchange, and what a
  mandatory publish would otherwise get back as basic.return: with the archive bound, relay's
  unrouted queue and its 503 for an unroutable event see nothing.
- Retention drops whole segments, only when a segment rolls over (a write into a full
  segment), never on a timer: `x-max-age` and `x-max-length-bytes` are bounds applied per
  segment; with the default 500 MB segments a small stream is never trimmed at all.
- `x-stream-offset` takes "first", "last" (the last chunk), "next", an offset (exact), an
  interval ("2s") or a timestamp (whole seconds; starts at the first chunk the broker wrote at
  or after it, so messages stamped a little earlier come too: filter by the message's own
  timestamp). Each delivery carries its offset in the `x-stream-offset` header.
- A stream consumer needs a prefetch (PRECONDITION_FAILED without), manual acks (else the
  broker closes the connection: NOT_IMPLEMENTED), and cannot basic.get (same); acks only grant
  credit.
- There is no end-of-stream signal over AMQP 0.9.1: a reader knows it has read everything
  published before it started by publishing a marker and reading until the marker; the
  message_count of a passive queue.declare lags behind (a figure refreshed every few seconds).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import (
    ChannelPreconditionFailed,
    ConnectionNotImplemented,
    PublishError,
)

from tests.conftest import AMQP_URL
from tests.support import eventually

pytestmark = pytest.mark.rabbit

BODY = 600  # bytes: about a relay envelope


class Objects:
    """Queues, streams and exchanges with names of their own, deleted after the test."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    async def stream(self, **arguments: Any) -> AbstractQueue:
        return await self.queue("stream", **arguments)

    async def queue(self, kind: str, **arguments: Any) -> AbstractQueue:
        self.queues.append(f"relay.test-streams-{uuid.uuid4().hex[:8]}")
        channel = await self.connection.channel()
        return await channel.declare_queue(
            self.queues[-1], durable=True, arguments={"x-queue-type": kind, **arguments}
        )

    async def exchange(self, kind: str, **arguments: Any) -> AbstractExchange:
        self.exchanges.append(f"relay.test-streams-{uuid.uuid4().hex[:8]}")
        channel = await self.connection.channel(on_return_raises=True)
        return await channel.declare_exchange(
            self.exchanges[-1], kind, durable=True, arguments=arguments
        )

    async def delete(self) -> None:
        channel = await self.connection.channel()
        for name in self.queues:
            await channel.queue_delete(name)
        for name in self.exchanges:
            await channel.exchange_delete(name)


@pytest.fixture
async def objects() -> AsyncIterator[Objects]:
    """On a connection of its own, which the test's own breakages leave alone."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        made = Objects(connection)
        try:
            yield made
        finally:
            await made.delete()


async def publisher(connection: AbstractConnection) -> AbstractChannel:
    """A channel with publisher confirms that raises for a returned (mandatory) message."""
    return await connection.channel(publisher_confirms=True, on_return_raises=True)


def numbered(number: int, **properties: Any) -> aio_pika.Message:
    """A message of about BODY bytes whose body starts with `number`."""
    return aio_pika.Message(b"%06d " % number + b"x" * (BODY - 7), **properties)


def number(message: AbstractIncomingMessage) -> int:
    return int(message.body[:6])


def numbers(messages: Sequence[AbstractIncomingMessage]) -> list[int]:
    return [number(m) for m in messages]


async def publish_in_order(
    exchange: AbstractExchange, messages: Sequence[tuple[str, aio_pika.Message]], window: int = 1
) -> None:
    """Publish (routing key, message) pairs in order, up to `window` unconfirmed at once (one
    channel keeps them in order); return once all are confirmed."""
    pending: set[asyncio.Task[Any]] = set()
    for key, message in messages:
        pending.add(asyncio.create_task(exchange.publish(message, key)))
        if len(pending) >= window:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    for task in pending:
        await task


async def read(
    connection: AbstractConnection,
    stream: str,
    offset: Any,
    until: Callable[[list[AbstractIncomingMessage]], bool],
    *,
    prefetch: int = 1000,
    timeout: float = 20.0,
) -> list[AbstractIncomingMessage]:
    """Consume `stream` from `offset` (acking each) until `until(what came)`; what came, in
    order. The consumer's channel is closed afterwards. (An `offset` None: a plain queue.)"""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(stream, ensure=False)
    arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    arguments = {} if offset is None else {"x-stream-offset": offset}
    await queue.consume(arrived.put, arguments=arguments)
    got: list[AbstractIncomingMessage] = []
    try:
        async with asyncio.timeout(timeout):
            while not until(got):
                got.append(await arrived.get())
                await got[-1].ack()
    except TimeoutError:
        raise AssertionError(f"read {stream} from {offset!r}: {len(got)} came") from None
    finally:
        await channel.close()
    return got


def through(last: int) -> Callable[[list[AbstractIncomingMessage]], bool]:
    """Read until the message numbered `last` has come."""
    return lambda got: bool(got) and number(got[-1]) == last


async def until_clock(moment: float) -> None:
    """Wait until time.time() reaches `moment` (for the facts that are about time)."""
    await asyncio.sleep(max(0.0, moment - time.time()))


def offsets(messages: Sequence[AbstractIncomingMessage]) -> list[int]:
    """Each delivery's offset in the stream, from its `x-stream-offset` header (an integer)."""
    found = [m.headers["x-stream-offset"] for m in messages]
    assert all(isinstance(offset, int) for offset in found), found
    return [offset for offset in found if isinstance(offset, int)]


# --- a stream bound with "#" ------------------------------------------------------------------


async def test_a_stream_bound_with_hash_keeps_every_message_in_publish_order(
    objects: Objects,
) -> None:
    # Given a topic exchange and a stream bound to it with "#"
    exchange = await objects.exchange("topic")
    stream = await objects.stream()
    await stream.bind(exchange, "#")

    # When 300 messages with all sorts of routing keys are published, 100 unconfirmed at once
    keys = ["invoice.42.paid", "a", "", "x.y.z.w", "invoice.7.sent", "#", "*.*"]
    confirmed = await publisher(objects.connection)
    target = await confirmed.get_exchange(exchange.name, ensure=False)
    await publish_in_order(
        target, [(keys[n % len(keys)], numbered(n)) for n in range(300)], window=100
    )

    # Then a reader gets all of them, in publish order, each with its routing key
    first = await read(objects.connection, stream.name, "first", through(299))
    assert numbers(first) == list(range(300))
    assert [m.routing_key for m in first] == [keys[n % len(keys)] for n in range(300)]
    # and, having read and acked them all, a second reader gets them all again
    again = await read(objects.connection, stream.name, "first", through(299))
    assert numbers(again) == list(range(300))
    assert offsets(again) == offsets(first)


async def test_a_stream_bound_with_hash_takes_what_the_alternate_exchange_would_get(
    objects: Objects,
) -> None:
    """With the archive bound, relay.unrouted (the alternate exchange's queue) gets nothing:
    the "#" binding matches every key, so no message is unroutable any more."""
    # Given relay's ingress topology: a topic exchange whose alternate exchange (fanout) leads
    # to a quorum queue, one queue bound for "invoice.*"
    alternate = await objects.exchange("fanout")
    unrouted = await objects.queue("quorum")
    await unrouted.bind(alternate, "")
    exchange = await objects.exchange("topic", **{"alternate-exchange": alternate.name})
    handled = await objects.queue("quorum")
    await handled.bind(exchange, "invoice.*")
    channel = await publisher(objects.connection)
    target = await channel.get_exchange(exchange.name, ensure=False)
    # where a message that no binding matches goes to the alternate exchange
    await target.publish(numbered(1), "nobody.binds.this")

    # When a stream is bound with "#" and the same kind of message is published
    stream = await objects.stream()
    await stream.bind(exchange, "#")
    await target.publish(numbered(2), "nobody.binds.this")
    # (and, to see what the alternate exchange got, the stream is unbound and a third one sent)
    await stream.unbind(exchange, "#")
    await target.publish(numbered(3), "nobody.binds.this")

    # Then the stream has the second one, and the alternate exchange's queue only the others
    assert numbers(await read(objects.connection, stream.name, "first", through(2))) == [2]
    assert numbers(await read(objects.connection, unrouted.name, None, through(3))) == [1, 3]


async def test_a_stream_bound_with_hash_means_a_mandatory_publish_never_comes_back(
    objects: Objects,
) -> None:
    """relay's ingress answers 503 when the broker returns a message that matched a handler's
    pattern but reached no partition (docs/RABBITMQ.md): with the archive bound, the message
    is taken by the archive and nothing is returned."""
    # Given relay's topology: the topic exchange (with its alternate exchange) bound for
    # "invoice.#" to a handler's headers exchange, which binds bucket "1" only
    alternate = await objects.exchange("fanout")
    unrouted = await objects.queue("quorum")
    await unrouted.bind(alternate, "")
    exchange = await objects.exchange("topic", **{"alternate-exchange": alternate.name})
    handler = await objects.exchange("headers")
    await handler.bind(exchange, "invoice.#")
    partition = await objects.queue("quorum")
    await partition.bind(handler, "", arguments={"x-match": "all", "relay-bucket": "1"})
    channel = await publisher(objects.connection)
    target = await channel.get_exchange(exchange.name, ensure=False)
    # where a message for bucket "2" comes back as returned (and skips the alternate exchange)
    with pytest.raises(PublishError):
        await target.publish(numbered(1, headers={"relay-bucket": "2"}), "invoice.42")

    # When a stream is bound with "#"
    stream = await objects.stream()
    await stream.bind(exchange, "#")

    # Then the same kind of message is confirmed, not returned, and is in the stream only
    await target.publish(numbered(2, headers={"relay-bucket": "2"}), "invoice.42")
    assert numbers(await read(objects.connection, stream.name, "first", through(2))) == [2]
    # (the alternate exchange got neither: once the stream is unbound, it gets the next
    # message that matches nothing, and only that one)
    await stream.unbind(exchange, "#")
    await target.publish(numbered(3), "nobody.binds.this")
    assert numbers(await read(objects.connection, unrouted.name, None, through(3))) == [3]


# --- retention --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_max_age_drops_whole_old_segments_when_a_segment_rolls_over(
    objects: Objects,
) -> None:
    """Retention is evaluated when the writer starts a new segment (it writes into a full
    one), never on a timer; it deletes the oldest segments whose newest message is older than
    x-max-age, never the segment being written. (Each 600-byte message is a chunk of about
    850 bytes: two fill a 1000-byte segment.)"""
    # Given a stream with 2 s retention and 1000-byte segments, holding 1..5
    stream = await objects.stream(**{"x-max-age": "2s", "x-stream-max-segment-size-bytes": 1000})
    channel = await publisher(objects.connection)
    for n in range(1, 6):
        await channel.default_exchange.publish(numbered(n), stream.name)

    # When 3 s pass with no write
    await until_clock(time.time() + 3)

    # Then all five are still there (the last segment, holding 5, is not full: nothing rolls)
    assert numbers(await read(objects.connection, stream.name, "first", through(5))) == [
        1, 2, 3, 4, 5
    ]  # fmt: skip

    # When 6..9 are written: the first fills 5's segment, the next rolls over to a new one
    for n in range(6, 10):
        await channel.default_exchange.publish(numbered(n), stream.name)

    # Then the segments holding only old messages are soon deleted (asynchronously), and 5,
    # which shares its segment with 6, stays: age is a lower bound on what is kept
    async def kept() -> list[int] | None:
        got = numbers(await read(objects.connection, stream.name, "first", through(9)))
        return got if got[0] != 1 else None

    left = await eventually(kept, timeout=15, interval=0.2, what="old segments deleted")
    assert left == list(range(left[0], 10))
    assert left[0] in (5, 6), left  # 1..4 gone; 5 stays while it shares a segment with 6
    print(f"max-age 2s: kept {left}")


@pytest.mark.parametrize(("segment", "trimmed"), [(None, False), (1000, True)])
async def test_max_length_bytes_is_applied_in_whole_segments(
    segment: int | None, trimmed: bool, objects: Objects
) -> None:
    """With the default 500 MB segments a small stream never rolls over, so x-max-length-bytes
    never applies; with small segments the oldest whole segments go once the rest exceed it:
    what is kept is at most x-max-length-bytes of segment files (the newest segment always),
    possibly much less."""
    arguments: dict[str, Any] = {"x-max-length-bytes": 5000}
    if segment is not None:
        arguments["x-stream-max-segment-size-bytes"] = segment
    stream = await objects.stream(**arguments)

    # When 20 messages of 600 bytes (12,000 bytes of bodies) are written
    channel = await publisher(objects.connection)
    for n in range(20):
        await channel.default_exchange.publish(numbered(n), stream.name)

    # Then: all of them kept (default segments), or only the newest few
    async def kept() -> list[AbstractIncomingMessage] | None:
        got = await read(objects.connection, stream.name, "first", through(19))
        return got if (number(got[0]) > 0) is trimmed else None

    left = await eventually(kept, timeout=15, interval=0.2, what="retention applied")
    assert numbers(left) == list(range(number(left[0]), 20))
    if trimmed:
        assert len(left) * BODY <= 5000, numbers(left)
        # and offsets skip one at each segment's start (a tracking chunk): not a count
        span = offsets(left)[-1] - offsets(left)[0] + 1
        assert span > len(left), offsets(left)
    print(f"max-length-bytes 5000, segments {segment}: kept {numbers(left)} {offsets(left)}")


# --- x-stream-offset --------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_timestamp_offset_starts_at_the_first_chunk_written_at_or_after_it(
    objects: Objects,
) -> None:
    """A timestamp offset (an AMQP timestamp: whole seconds) selects chunks by the time the
    broker wrote them. Messages stamped just before it, but written after, come too; their own
    `timestamp` property (kept as published, whole seconds) sorts them out exactly."""
    stream = await objects.stream()
    channel = await publisher(objects.connection)

    # Given messages stamped at creation and published without pause, up to 200 unconfirmed,
    # from 0.3 s before a whole second `cut` to 0.3 s after it
    cut = math.ceil(time.time()) + 1
    await until_clock(cut - 0.3)
    stamped: dict[int, float] = {}
    confirmed_at: dict[int, float] = {}
    pending: set[asyncio.Task[Any]] = set()

    def confirmed(n: int) -> Callable[[asyncio.Task[Any]], None]:
        return lambda _: confirmed_at.__setitem__(n, time.time())

    while (now := time.time()) < cut + 0.3:
        n = len(stamped)
        stamped[n] = now
        message = numbered(n, timestamp=datetime.fromtimestamp(now, UTC))
        task = asyncio.create_task(channel.default_exchange.publish(message, stream.name))
        task.add_done_callback(confirmed(n))
        pending.add(task)
        if len(pending) >= 200:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        await asyncio.sleep(0)
    for task in pending:
        await task
    last = len(stamped) - 1

    # When a reader starts at `cut`
    got = await read(
        objects.connection, stream.name, datetime.fromtimestamp(cut, UTC), through(last)
    )

    # Then it gets everything stamped at or after `cut`, none confirmed well before it, and
    # some stamped before it
    came = set(numbers(got))
    after = {n for n, at in stamped.items() if at >= cut}
    early = came - after
    assert after <= came
    assert not {n for n in came if confirmed_at[n] < cut - 0.1}
    assert early, "nothing stamped before the cut came"
    print(
        f"timestamp offset: {len(after)} stamped after the cut, {len(early)} before it came too, "
        f"up to {1000 * (cut - min(stamped[n] for n in early)):.0f} ms early"
    )
    # and filtering by each message's own timestamp gives exactly those stamped after `cut`
    assert all(m.timestamp is not None and m.timestamp.microsecond == 0 for m in got)
    own = {
        number(m) for m in got if m.timestamp and m.timestamp >= datetime.fromtimestamp(cut, UTC)
    }
    assert own == after


@pytest.mark.timeout(30)
async def test_offset_specs_first_last_next_a_number_and_an_interval(
    objects: Objects,
) -> None:
    # Given 0..4 written, then (3 s later) 5..9, each its own chunk (confirmed one by one)
    stream = await objects.stream()
    channel = await publisher(objects.connection)
    published_at = datetime.now(UTC).replace(microsecond=0)
    for n in range(5):
        await channel.default_exchange.publish(numbered(n, timestamp=published_at), stream.name)
    await until_clock(time.time() + 3)
    for n in range(5, 10):
        await channel.default_exchange.publish(numbered(n), stream.name)

    async def from_(offset: Any) -> list[int]:
        return numbers(await read(objects.connection, stream.name, offset, through(9)))

    # Then "first" starts at the first message; each delivery carries its offset
    first = await read(objects.connection, stream.name, "first", through(9))
    assert numbers(first) == list(range(10))
    assert offsets(first) == list(range(10))
    assert [m.timestamp for m in first[:5]] == [published_at] * 5  # kept as published
    # a number at that offset exactly
    assert await from_(7) == [7, 8, 9]
    # "last" at the last chunk (here one message; after a burst, a chunk holds many)
    assert await from_("last") == [9]
    # an interval counts back from now, by the time each chunk was written
    assert await from_("2s") == [5, 6, 7, 8, 9]
    # and "next" gets only what is written after the consumer started
    reader = await objects.connection.channel()
    await reader.set_qos(prefetch_count=10)
    queue = await reader.get_queue(stream.name, ensure=False)
    arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(arrived.put, arguments={"x-stream-offset": "next"})
    await channel.default_exchange.publish(numbered(10), stream.name)
    assert number(await asyncio.wait_for(arrived.get(), 10)) == 10
    await reader.close()


async def test_an_offset_string_must_be_first_last_next_or_an_interval(objects: Objects) -> None:
    stream = await objects.stream()
    channel = await objects.connection.channel()
    await channel.set_qos(prefetch_count=10)
    queue = await channel.get_queue(stream.name, ensure=False)
    # units Y M D h m s; no milliseconds, and a number must be sent as a number
    with pytest.raises(ChannelPreconditionFailed, match="invalid_stream_offset_arg"):
        await queue.consume(arrived_nowhere, arguments={"x-stream-offset": "100ms"})


async def arrived_nowhere(message: AbstractIncomingMessage) -> None:
    raise AssertionError("no delivery expected")


# --- consuming --------------------------------------------------------------------------------


async def test_a_stream_consumer_needs_a_prefetch_and_manual_acks_and_cannot_get(
    objects: Objects,
) -> None:
    stream = await objects.stream()
    # Without basic.qos the consumer is refused, and the channel closed
    channel = await objects.connection.channel()
    queue = await channel.get_queue(stream.name, ensure=False)
    with pytest.raises(ChannelPreconditionFailed, match="consumer prefetch count is not set"):
        await queue.consume(arrived_nowhere)

    # With a prefetch but automatic acks, the broker closes the whole connection
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)
        queue = await channel.get_queue(stream.name, ensure=False)
        with pytest.raises(ConnectionNotImplemented, match="automatic acknowledgement"):
            await queue.consume(arrived_nowhere, no_ack=True)
    assert connection.is_closed

    # and so does basic.get
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        queue = await (await connection.channel()).get_queue(stream.name, ensure=False)
        with pytest.raises(ConnectionNotImplemented, match=r"basic\.get not supported"):
            await queue.get()
    assert connection.is_closed


async def test_acks_only_grant_credit_and_reading_removes_nothing(objects: Objects) -> None:
    # Given 0..9 in a stream, each its own chunk
    stream = await objects.stream()
    channel = await publisher(objects.connection)
    for n in range(10):
        await channel.default_exchange.publish(numbered(n), stream.name)

    # When a consumer with prefetch 3 holds what it gets
    reader = await objects.connection.channel()
    await reader.set_qos(prefetch_count=3)
    queue = await reader.get_queue(stream.name, ensure=False)
    arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(arrived.put, arguments={"x-stream-offset": "first"})
    held = [await asyncio.wait_for(arrived.get(), 10) for _ in range(3)]

    # Then it gets 3 and no more until it acks (a quiet half second shows the absence)
    await asyncio.sleep(0.5)
    assert numbers(held) == [0, 1, 2]
    assert arrived.empty()
    # one ack, one more delivery
    await held[0].ack()
    held.append(await asyncio.wait_for(arrived.get(), 10))
    await asyncio.sleep(0.5)
    assert numbers(held) == [0, 1, 2, 3]
    assert arrived.empty()
    # and acking as it goes it reads to the end
    for message in held[1:]:
        await message.ack()
    while number(held[-1]) != 9:
        held.append(await asyncio.wait_for(arrived.get(), 10))
        await held[-1].ack()
    await reader.close()

    # and all ten are still there for the next reader
    assert numbers(await read(objects.connection, stream.name, "first", through(9))) == list(
        range(10)
    )


# --- reading to the end -----------------------------------------------------------------------


async def test_a_reader_knows_it_has_read_everything_by_a_marker_it_publishes(
    objects: Objects,
) -> None:
    """No end-of-stream signal comes over AMQP 0.9.1 (a consumer at the end just waits), and
    offsets are not counts. A reader that publishes a marker (confirmed) to the stream itself
    and reads until the marker has seen everything confirmed before it started."""
    # Given 0..199 in a stream, confirmed (a burst: many per chunk)
    stream = await objects.stream()
    channel = await publisher(objects.connection)
    await publish_in_order(
        channel.default_exchange, [(stream.name, numbered(n)) for n in range(200)], window=200
    )

    # When a reader publishes a marker and reads from "first" until it
    marker = uuid.uuid4().hex
    await channel.default_exchange.publish(
        aio_pika.Message(b"marker", headers={"relay-marker": marker}), stream.name
    )
    got = await read(
        objects.connection,
        stream.name,
        "first",
        lambda got: bool(got) and got[-1].headers.get("relay-marker") == marker,
    )

    # Then it has everything before the marker
    assert numbers(got[:-1]) == list(range(200))


@pytest.mark.timeout(60)
async def test_a_passive_declare_counts_a_stream_late(objects: Objects) -> None:
    """queue.declare passive (and the management API's `messages`) gives a stream's count as
    last sampled, every few seconds: right after confirmed publishes it may be far behind."""
    stream = await objects.stream()
    channel = await publisher(objects.connection)
    await publish_in_order(
        channel.default_exchange, [(stream.name, numbered(n)) for n in range(300)], window=100
    )

    async def count() -> int:
        declared = await channel.declare_queue(stream.name, passive=True)
        assert declared.declaration_result.message_count is not None
        return declared.declaration_result.message_count

    async def all_counted() -> bool:
        return await count() == 300

    at_once = await count()
    assert at_once <= 300
    await eventually(all_counted, timeout=20, interval=0.5, what="a count of 300")
    print(f"passive declare right after 300 confirmed publishes: {at_once}")
