"""A handler's scheduler in one worker, against fakes (no broker): the tries of failed messages
it remembers across channel cuts stay bounded."""

from __future__ import annotations

import pytest
from pamqp.commands import Basic

from relay.worker import scheduler as scheduler_module
from relay.worker.partition import Delivery, Partition
from relay.worker.scheduler import HandlerScheduler
from tests.fakes import UNAVAILABLE, Changed, FakeTarget, a_handler


def deliveries_and_partition() -> tuple[HandlerScheduler, Partition]:
    """A handler whose every delivery fails transiently, and one partition of it."""
    handler, repeats = a_handler()
    deliveries = HandlerScheduler(handler, FakeTarget(Changed(), otherwise=UNAVAILABLE), repeats)
    partition = Partition(handler, 0, deliveries)
    deliveries.partitions.append(partition)
    return deliveries, partition


def a_delivery(partition: Partition, message_id: str) -> Delivery:
    return Delivery(
        partition=partition, generation=partition.generation, tag=1, key="invoice:7", bucket=5,
        held_by=None, message_id=message_id, body=b"{}",
        properties=Basic.Properties(message_id=message_id, headers={}), earlier=0,
    )  # fmt: skip


async def fail_after_a_cut(
    deliveries: HandlerScheduler, partition: Partition, message_id: str
) -> Delivery:
    """Deliver `message_id` once, failing, while its channel closes (its partition moved
    elsewhere): it waits for no retry here."""
    delivery = a_delivery(partition, message_id)
    partition.generation += 1  # the channel it came on closed
    await deliveries._deliver(delivery)
    deliveries.forget(delivery)
    return delivery


@pytest.mark.timeout(5)
async def test_the_tries_of_failed_messages_are_remembered_up_to_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler_module, "TRIES_REMEMBERED", 3)
    deliveries, partition = deliveries_and_partition()

    # When five messages fail and their partition moves elsewhere, none coming back
    for i in range(5):
        await fail_after_a_cut(deliveries, partition, f"envoice:{i}")

    # Then only the newest three are remembered
    assert list(deliveries._tries) == ["envoice:2", "envoice:3", "envoice:4"]

    # And one failing again becomes the newest, so the oldest goes
    await fail_after_a_cut(deliveries, partition, "envoice:2")
    await fail_after_a_cut(deliveries, partition, "envoice:5")
    assert list(deliveries._tries) == ["envoice:4", "envoice:2", "envoice:5"]


@pytest.mark.timeout(5)
async def test_a_remembered_message_coming_again_goes_on_with_its_tries() -> None:
    deliveries, partition = deliveries_and_partition()
    failed = await fail_after_a_cut(deliveries, partition, "envoice:1")

    again = a_delivery(partition, "envoice:1")
    deliveries.ready(again)

    assert (again.attempts, again.first_attempt) == (1, failed.first_attempt)
    assert again.failed
    deliveries.forget(again)
    await deliveries.stop()
