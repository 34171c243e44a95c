"""The ledger the fault tests judge by: what it calls lost, reordered, duplicated, late."""

from __future__ import annotations

import uuid

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from tests.processes import Deliveries, Ledger, PartitionsEmpty
from tests.support import AMQP_URL


def ledger() -> Ledger:
    accepted = Ledger()
    for key, message_id in [("k1", "a"), ("k1", "b"), ("k1", "c"), ("k2", "x"), ("k2", "y")]:
        accepted.accept(key, message_id)
    return accepted


def test_everything_once_in_order_is_clean() -> None:
    tally = ledger().check([("k1", "a"), ("k2", "x"), ("k1", "b"), ("k2", "y"), ("k1", "c")])

    assert tally.ok
    assert (tally.delivered, tally.lost, tally.reordered, tally.duplicates) == (5, 0, 0, 0)
    assert tally.late_repeats == 0


def test_lost_and_reordered_are_counted_per_webhook_and_per_key() -> None:
    tally = ledger().check([("k1", "b"), ("k1", "a"), ("k2", "x")])  # c and y never came

    assert not tally.ok
    assert (tally.lost, tally.reordered) == (2, 1)  # k1 went b, a


def test_a_repeat_after_a_later_webhook_of_its_key_is_a_late_repeat_not_a_reordering() -> None:
    # a, b delivered, then a again (its ack was lost): first deliveries are in order
    tally = ledger().check(
        [("k1", "a"), ("k1", "b"), ("k1", "a"), ("k1", "c"), ("k2", "x"), ("k2", "x"), ("k2", "y")]
    )

    assert tally.ok
    assert tally.duplicates == 2  # a and x twice
    assert tally.late_repeats == 1  # a came back after b; x's repeat came before y: not late
    assert "late repeats: a" in tally.problems


def test_deliveries_never_accepted_are_left_out() -> None:
    tally = ledger().check(
        [("k1", "a"), ("k1", "zz"), ("k1", "b"), ("k1", "c"), ("k2", "x"), ("k2", "y")]
    )

    assert tally.ok
    assert (tally.delivered, tally.duplicates) == (5, 0)


class LateRepeat:
    """Deliveries and a probe of the partitions: everything was delivered once, and one message
    is still in a partition (a worker delivered it and stopped before acking it); it comes again
    once the probe has found it there `polls` times, and then the partitions are empty."""

    def __init__(self, polls: int = 3) -> None:
        self.delivered: list[tuple[str, str]] = [("k1", "a"), ("k1", "b"), ("k1", "c")]
        self.delivered += [("k2", "x"), ("k2", "y")]
        self.polls = polls

    def deliveries(self) -> Deliveries:
        return list(self.delivered)

    async def empty(self) -> bool:
        self.polls -= 1
        if self.polls == 0:
            self.delivered.append(("k1", "b"))  # the repeat reaches the handler
        return self.polls <= 0


async def test_the_final_count_waits_for_the_partitions_to_be_empty_and_counts_late_repeats() -> (
    None
):
    # Given every accepted id delivered once, and a repeat of b still in a partition
    late = LateRepeat()

    # When the ledger waits for the deliveries
    tally = await ledger().delivered(late.deliveries, late.empty, timeout=5, interval=0.01)

    # Then it counted the repeat that came after everything was delivered: the count taken as
    # soon as nothing was lost (the ledger's old way) said duplicates == 0
    assert late.polls == 0
    assert tally.ok
    assert tally.duplicates == 1, tally
    assert tally.late_repeats == 1  # b again after c


async def test_partitions_never_empty_fail_the_count_at_the_deadline() -> None:
    late = LateRepeat(polls=1_000_000)

    with pytest.raises(AssertionError, match="partitions still held messages"):
        await ledger().delivered(late.deliveries, late.empty, timeout=0.2, interval=0.01)


@pytest.mark.rabbit
async def test_the_partitions_probe_counts_ready_and_unacked_messages_as_they_are_now(
    channel: AbstractChannel,
) -> None:
    # Given two quorum queues (as partitions are), one holding a message, one not existing
    name, missing = f"ledger-{uuid.uuid4().hex[:8]}", f"ledger-{uuid.uuid4().hex[:8]}"
    queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    vhost = aio_pika.connection.make_url(AMQP_URL).path.removeprefix("/") or "/"
    probe = PartitionsEmpty([name, missing], vhost=vhost)
    try:
        assert await probe(), probe
        await channel.default_exchange.publish(aio_pika.Message(b"m"), name)
        # Then a ready message is seen at once
        assert not await probe()
        assert str(probe) == f"messages held: {{{name!r}: 1}}"
        # and so is one delivered and not acked yet (the management API's figures, sampled,
        # would say 0 for seconds)
        message = await queue.get(no_ack=False, timeout=5)
        assert message is not None
        assert not await probe(), probe
        await message.ack()
        assert await probe(), probe
    finally:
        await queue.delete(if_unused=False, if_empty=False)
