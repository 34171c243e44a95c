"""A partition and its handler's deliveries, driven in-process through fakes (tests/fakes.py):
order per key, retries, dead letters, repeats, parking, partition changes and channel cuts, in
milliseconds. Broker behaviour itself is claimed by tests/test_worker.py and its kin."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from relay import wire
from relay.worker.delivery import Outcome
from relay.worker.keys import prefetch
from tests.fakes import REJECTED, UNAVAILABLE, a_rig, turns

FOREVER = 60_000  # a backoff that does not end within a test (ms)


# --- order per key ----------------------------------------------------------------------------


@pytest.mark.timeout(5)
async def test_a_key_waits_while_its_head_retries_then_goes_on() -> None:
    rig = await a_rig({"a1": [UNAVAILABLE, UNAVAILABLE]})

    rig.queue.put("a1")
    rig.queue.put("a2")
    await rig.until(lambda: rig.queue.acked == ["a1", "a2"])

    # a2 was not tried until a1 was delivered, on its third try
    assert rig.target.calls == [("a1", 1), ("a1", 2), ("a1", 3), ("a2", 1)]
    assert rig.publish.recorded() == [("a1", "delivered"), ("a2", "delivered")]
    await rig.stop()


@pytest.mark.timeout(5)
async def test_other_keys_go_on_while_a_key_waits_for_its_retry() -> None:
    rig = await a_rig({"a1": [UNAVAILABLE]}, backoff_initial_ms=FOREVER, backoff_max_ms=FOREVER)

    rig.queue.put("a1", key="invoice:1")
    rig.queue.put("a2", key="invoice:1")
    rig.queue.put("b1", key="invoice:2")
    rig.queue.put("b2", key="invoice:2")
    await rig.until(lambda: rig.queue.acked == ["b1", "b2"])
    await turns()

    assert rig.target.calls == [("a1", 1), ("b1", 1), ("b2", 1)]  # a2 waits behind a1
    assert rig.scheduler.policy.current_state() is wire.State.RETRYING
    await rig.stop()


@pytest.mark.timeout(5)
async def test_each_key_is_delivered_and_acked_in_its_order() -> None:
    script: dict[str, list[Outcome]] = {"k1-1": [UNAVAILABLE], "k2-0": [UNAVAILABLE] * 2}
    rig = await a_rig(script, concurrency=3)
    sent = [f"k{k}-{n}" for n in range(5) for k in range(4)]  # keys interleaved

    for message_id in sent:
        rig.queue.put(message_id, key=f"invoice:{message_id.split('-')[0]}")
    await rig.until(lambda: len(rig.queue.acked) == len(sent))

    for k in range(4):
        mine = [f"k{k}-{n}" for n in range(5)]
        assert [m for m in rig.target.delivered if m in mine] == mine
        assert [m for m in rig.queue.acked if m in mine] == mine
    await rig.stop()


@pytest.mark.timeout(5)
async def test_at_most_concurrency_deliveries_are_in_flight() -> None:
    rig = await a_rig(concurrency=2)
    for n in range(6):
        rig.target.hold(f"m{n}")
        rig.queue.put(f"m{n}", key=f"invoice:{n}")

    for n in range(6):
        await rig.until(lambda n=n: rig.target.called(f"m{n}") == 1)  # type: ignore[misc]
        await turns()
        assert rig.target.in_flight <= 2
        rig.target.let_go(f"m{n}")
    await rig.until(lambda: len(rig.queue.acked) == 6)

    assert rig.target.most_in_flight == 2
    await rig.stop()


@pytest.mark.timeout(5)
async def test_the_window_holds_at_most_window_unacked_deliveries() -> None:
    rig = await a_rig(window=3)
    rig.target.hold("m0")
    for n in range(10):
        rig.queue.put(f"m{n}", key=f"invoice:{n}")

    await rig.until(lambda: len(rig.channel.unacked) == 3)
    await turns()
    assert rig.channel.prefetch == 3
    assert len(rig.channel.unacked) == 3  # m0 held: two more were delivered and acked, no more
    rig.target.let_go("m0")
    await rig.until(lambda: len(rig.queue.acked) == 10)

    assert rig.channel.most_unacked == 3
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_key_s_long_backlog_does_not_hold_back_the_other_keys_of_its_partition() -> None:
    # Given a partition with the default window (2,048 messages at first: the 310 fit; a window
    # of 256 messages did not), one key's head held by the endpoint
    rig = await a_rig()
    rig.target.hold("a0")

    # When 300 messages of that key are queued, then one each of 10 other keys
    for n in range(300):
        rig.queue.put(f"a{n}", key="invoice:1")
    for n in range(10):
        rig.queue.put(f"b{n}", key=f"invoice:{n + 2}")

    # Then the 10 are delivered and acked while the busy key's head is still in flight
    await rig.until(lambda: len(rig.queue.acked) == 10)
    assert rig.queue.acked == [f"b{n}" for n in range(10)]
    assert rig.target.called("a1") == 0
    # and the busy key goes on in its order once its head is answered
    rig.target.let_go("a0")
    await rig.until(lambda: len(rig.queue.acked) == 310)
    assert [m for m in rig.queue.acked if m.startswith("a")] == [f"a{n}" for n in range(300)]
    await rig.stop()


@pytest.mark.timeout(5)
async def test_the_window_holds_window_bytes_of_messages_of_the_mean_size_seen() -> None:
    # Given a window of 40 KiB: before any message is seen, 2 KiB each is assumed
    rig = await a_rig(window_bytes=40 * 1024)
    assert rig.channel.prefetch == 20

    # When messages of about 1 KiB each (their ~20-byte bodies and 1 KiB of overhead) were held
    for n in range(20):
        rig.queue.put(f"m{n}", key=f"invoice:{n}")
    await rig.until(lambda: len(rig.queue.acked) == 20)
    await rig.cut()
    await rig.consume()

    # Then the next channel's window holds about 40 of them
    mean = 1024 + len(b'{"id": "m10"}')
    assert rig.channel.prefetch == 40 * 1024 // mean
    await rig.stop()


@pytest.mark.parametrize(
    ("window", "window_bytes", "mean", "expected"),
    [
        (8192, 4 * 1024 * 1024, 2048.0, 2048),  # the defaults, nothing seen yet
        (8192, 4 * 1024 * 1024, 1100.0, 3813),
        (8192, 4 * 1024 * 1024, 100.0, 8192),  # tiny messages: `window` caps the count
        (8192, 4 * 1024 * 1024, 10 * 1024 * 1024.0, 1),  # a message beyond the bytes: one
    ],
)
def test_the_prefetch_is_the_bytes_over_the_mean_size_within_one_and_window(
    window: int, window_bytes: int, mean: float, expected: int
) -> None:
    assert prefetch(window, window_bytes, mean) == expected


# --- final outcomes: dead letters and records before the ack ---------------------------------


@pytest.mark.timeout(5)
async def test_a_permanent_failure_is_dead_lettered_confirmed_before_the_ack() -> None:
    rig = await a_rig({"a1": [REJECTED]})
    rig.publish.held.add(".dlq")

    rig.queue.put("a1")
    rig.queue.put("a2")
    await rig.until(lambda: rig.publish.waiting(".dlq") == 1)
    await turns()

    # Then nothing is recorded, acked or delivered after it until the dead letter is confirmed
    assert (rig.publish.recorded(), rig.queue.acked, rig.target.called("a2")) == ([], [], 0)
    rig.publish.confirm(".dlq")
    await rig.until(lambda: rig.queue.acked == ["a1", "a2"])
    [dead] = rig.publish.to(".dlq")
    assert dead.headers["x-relay-reason"] == "HTTP 422"
    assert rig.publish.recorded() == [("a1", "dead-lettered"), ("a2", "delivered")]
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_poison_message_is_dead_lettered_after_max_attempts_while_others_succeed() -> None:
    rig = await a_rig({"a1": [UNAVAILABLE] * 3}, max_attempts=3)

    rig.queue.put("a1", key="invoice:1")
    for n in range(3):
        rig.queue.put(f"b{n}", key="invoice:2")
    rig.queue.put("a2", key="invoice:1")
    await rig.until(lambda: len(rig.queue.acked) == 5)

    assert rig.target.called("a1") == 3
    assert ("a1", "dead-lettered") in rig.publish.recorded()
    assert rig.queue.acked.index("a1") < rig.queue.acked.index("a2")
    assert not rig.scheduler.policy.parked
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_message_is_acked_only_once_its_outcome_record_is_confirmed() -> None:
    rig = await a_rig()
    rig.publish.held.add(".outcomes")

    rig.queue.put("a1")
    rig.queue.put("a2")
    await rig.until(lambda: rig.publish.waiting(".outcomes") == 1)
    await turns()

    assert rig.target.delivered == ["a1"]
    assert (rig.queue.acked, rig.target.called("a2")) == ([], 0)  # and its key waits
    rig.publish.confirm(".outcomes")
    await rig.until(lambda: rig.queue.acked == ["a1", "a2"])
    await rig.stop()


@pytest.mark.timeout(5)
async def test_the_attempt_counts_on_from_the_brokers_delivery_count() -> None:
    rig = await a_rig()
    rig.queue.put("a1", delivered_before=2)  # by workers gone since

    await rig.until(lambda: rig.queue.acked == ["a1"])

    assert rig.target.calls == [("a1", 3)]
    await rig.stop()


# --- repeats ----------------------------------------------------------------------------------


@pytest.mark.timeout(5)
async def test_a_repeat_is_acked_without_delivery() -> None:
    rig = await a_rig()
    rig.scheduler.decided.add("a1")  # its outcome is in the handler's outcome log

    rig.queue.put("a1")
    rig.queue.put("a2")
    await rig.until(lambda: rig.queue.acked == ["a1", "a2"])

    assert rig.target.calls == [("a2", 1)]
    assert rig.publish.recorded() == [("a2", "delivered")]
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_copy_of_a_delivered_message_is_a_repeat() -> None:
    rig = await a_rig()
    rig.queue.put("a1")
    await rig.until(lambda: rig.queue.acked == ["a1"])

    rig.queue.put("a1")  # published twice, say
    await rig.until(lambda: rig.queue.acked == ["a1", "a1"])

    assert rig.target.calls == [("a1", 1)]
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_replayed_message_is_delivered_even_if_its_outcome_is_recorded() -> None:
    rig = await a_rig()
    rig.scheduler.decided.add("a1")

    rig.queue.put("a1", headers={wire.REPLAYED_HEADER: "replay-1"})
    await rig.until(lambda: rig.queue.acked == ["a1"])

    assert rig.target.calls == [("a1", 1)]
    [message] = rig.publish.to(".outcomes")
    [record] = wire.read_outcomes(message.body)
    assert (record["id"], record["replayed"]) == ("a1", True)
    await rig.stop()


# --- parking ----------------------------------------------------------------------------------


@pytest.mark.timeout(5)
async def test_an_outage_parks_the_handler_and_a_probes_success_resumes_it() -> None:
    rig = await a_rig({"a1": [UNAVAILABLE] * 2, "b1": [UNAVAILABLE]}, max_attempts=3)

    # Given a handler failing max_attempts times in a row across its keys
    rig.queue.put("a1", key="invoice:1")
    rig.queue.put("b1", key="invoice:2")
    await rig.until(lambda: sorted(rig.queue.acked) == ["a1", "b1"])

    # Then it was parked after the third failure; one probe's success resumed it, and the
    # other message followed
    assert rig.target.calls[:3] == [("a1", 1), ("b1", 1), ("a1", 2)]
    assert len(rig.target.calls) == 5  # no try beyond the probe and the other's retry
    assert not rig.scheduler.policy.parked
    assert rig.publish.to(".dlq") == []  # an outage dead-letters nothing

    def states() -> list[str]:  # recorded in relay.state, in the background
        return [orjson.loads(m.body)["state"] for m in rig.publish.to("relay.state")]

    await rig.until(lambda: states()[-1:] == ["live"])
    assert states()[:2] == ["retrying", "parked"]
    await rig.stop()


# --- partition changes ------------------------------------------------------------------------


@pytest.mark.timeout(5)
async def test_a_fence_passes_once_the_earlier_messages_of_its_buckets_are_done() -> None:
    rig = await a_rig()
    bucket = wire.bucket("invoice:7")
    rig.target.hold("a1")

    rig.queue.put("a1")
    rig.queue.put_marker(wire.FENCE_START, "c1", [bucket])
    rig.queue.put("a2")  # routed to both partitions while the bindings changed
    rig.queue.put_marker(wire.FENCE, "c1", [bucket])
    await rig.until(lambda: len(rig.channel.unacked) == 4)
    await turns()

    assert rig.publish.to("relay.state") == []  # a1 and a2 are not done
    rig.target.let_go("a1")
    await rig.until(lambda: len(rig.queue.acked) == 4)

    assert rig.queue.acked == ["a1", "a2", "marker:c1:fence-start", "marker:c1:fence"]
    records = [orjson.loads(m.body) for m in rig.publish.to("relay.state")]
    [release] = [r for r in records if r["kind"] == "release"]
    assert (release["kind"], release["change"], release["buckets"]) == ("release", "c1", [bucket])
    assert release["duplicates"] == ["a2"]
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_hold_keeps_its_buckets_messages_until_released_and_skips_duplicates() -> None:
    rig = await a_rig()
    bucket = wire.bucket("invoice:7")

    rig.queue.put_marker(wire.HOLD, "c1", [bucket])
    rig.queue.put("a0")  # delivered by the old partition too
    rig.queue.put("a1")
    rig.queue.put("b1", key="invoice:other")
    await rig.until(lambda: rig.queue.acked == ["b1"])
    await turns()
    assert rig.target.calls == [("b1", 1)]

    await rig.scheduler.take_release("c1", [bucket], ["a0"])
    await rig.until(lambda: len(rig.queue.acked) == 4)

    assert rig.target.calls == [("b1", 1), ("a1", 1)]
    assert rig.queue.acked == ["b1", "marker:c1:hold", "a0", "a1"]
    await rig.stop()


# --- channel cuts -----------------------------------------------------------------------------


@pytest.mark.timeout(5)
async def test_after_a_cut_the_old_window_is_neither_acked_nor_delivered() -> None:
    rig = await a_rig(concurrency=1)
    rig.target.hold("a1")
    rig.queue.put("a1", key="invoice:1")
    rig.queue.put("b1", key="invoice:2")  # ready, waiting for the one slot
    await rig.until(lambda: rig.target.called("a1") == 1)
    old = rig.channel

    # When the channel is cut while a1 is in flight
    cutting = asyncio.ensure_future(rig.cut())
    await turns()
    assert rig.partition.generation == 1  # its window forgotten; a1 still in flight
    rig.target.let_go("a1")
    await cutting

    # Then a1's outcome is neither recorded nor acked, and b1 was not started on the old channel
    assert (old.acked, rig.publish.recorded(), rig.target.called("b1")) == ([], [], 0)
    # And on the next channel each comes again once, in order; a1 again (its outcome unrecorded)
    await rig.consume()
    await rig.until(lambda: rig.queue.acked == ["a1", "b1"])
    assert rig.target.calls == [("a1", 1), ("a1", 2), ("b1", 2)]
    assert rig.target.most_in_flight == 1  # the copy did not overlap the old delivery
    await rig.stop()


@pytest.mark.timeout(5)
async def test_a_retry_of_a_cut_channel_is_not_made_on_the_next_and_its_tries_go_on() -> None:
    rig = await a_rig({"a1": [UNAVAILABLE, UNAVAILABLE]})
    rig.target.hold("a1")
    rig.queue.put("a1")
    await rig.until(lambda: rig.target.called("a1") == 1)

    cutting = asyncio.ensure_future(rig.cut())
    await turns()
    assert rig.partition.generation == 1
    rig.target.let_go("a1")  # fails: its retry belongs to a channel gone
    await cutting
    await rig.consume()
    await rig.until(lambda: rig.queue.acked == ["a1"])

    # tried once more from the new channel's copy only (attempt 2 failed, 3 delivered)
    assert rig.target.calls == [("a1", 1), ("a1", 2), ("a1", 3)]
    assert rig.publish.recorded() == [("a1", "delivered")]
    await rig.stop()
