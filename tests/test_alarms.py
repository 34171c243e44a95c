"""Broker resource alarms: RabbitMQ over its memory watermark blocks every connection that
publishes. Forced on the real (shared) broker by setting the watermark below what it uses, for a
few seconds, and put back as found whatever happens: the ingress refuses at once while blocked
and accepts again after, the worker delivers through it, and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from typing import cast
from urllib.parse import quote, urlsplit

import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client import REGISTRY

from relay.ingress import PUBLISHER
from relay.publisher import Publisher
from tests.conftest import AMQP_URL, MakeSettings, Publish, StartWorker
from tests.handlers_for_tests import HttpHandler
from tests.support import (
    activity,
    eventually,
    handler,
    logged,
    management,
    new_event,
    queue_depth,
    running_ingress,
    signed_body,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.fault]

PATH = "/webhooks/envoice"
ALARM_SECONDS = 30.0  # to see the alarm raised or cleared: rabbitmqctl takes seconds here
REFUSED_WITHIN = 0.1  # seconds: a webhook's 503 while blocked


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: exit {process.returncode}"
    return out.decode().strip()


async def memory_alarm_is(raised: bool) -> bool:
    async with management(AMQP_URL) as api, api.get("/api/nodes") as answer:
        nodes = await answer.json()
    return all(node.get("mem_alarm") is raised for node in nodes)


class Alarm:
    restored = 0.0  # perf_counter when the watermark was put back


@contextlib.asynccontextmanager
async def memory_alarm() -> AsyncIterator[Alarm]:
    """The node's memory alarm raised (watermark 1 MB) for the block's duration; the watermark is
    put back exactly as it was read (an Erlang term: a fraction or {absolute, Bytes})."""
    alarm = Alarm()
    found = await rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    try:
        await rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1000000")
        await eventually(
            lambda: memory_alarm_is(True), timeout=ALARM_SECONDS, what="memory alarm raised"
        )
        yield alarm
    finally:
        await rabbitmqctl("eval", f"vm_memory_monitor:set_vm_memory_high_watermark({found}).")
        alarm.restored = time.perf_counter()
    await eventually(
        lambda: memory_alarm_is(False), timeout=ALARM_SECONDS, what="memory alarm cleared"
    )


async def connection_states() -> dict[str, str]:
    """The broker's state of each named connection in the suite's vhost (running, blocking:
    notified, blocked: not read from)."""
    vhost = quote(urlsplit(AMQP_URL).path[1:] or "/", safe="")
    async with management(AMQP_URL) as api, api.get(f"/api/vhosts/{vhost}/connections") as got:
        connections = await got.json()
    return {
        c["client_properties"].get("connection_name", ""): c.get("state", "") for c in connections
    }


def blocked_gauge(component: str) -> float | None:
    return REGISTRY.get_sample_value("relay_broker_blocked", {"component": component})


async def depth(channel: AbstractChannel, queues: Sequence[str]) -> int:
    return sum([await queue_depth(channel, name) for name in queues])


@pytest.mark.timeout(4 * ALARM_SECONDS + 60)
async def test_while_the_broker_blocks_publishing_webhooks_get_503_at_once_and_none_is_lost(
    make_settings: MakeSettings, channel: AbstractChannel, logs: list[dict[str, object]]
) -> None:
    # Given an ingress that accepted five webhooks, with a publish timeout longer than the alarm
    settings = make_settings(
        handlers=[handler({"url": "http://127.0.0.1:9/unused"})],
        broker={"publish_timeout_seconds": 4 * ALARM_SECONDS},
    )
    source = settings.sources[0]
    accepted: list[str] = []

    async with running_ingress(settings) as ingress:
        publisher = cast(Publisher, ingress.app[PUBLISHER])

        async def post() -> tuple[int, dict[str, str], float]:
            started = time.perf_counter()
            status, answer, headers = await ingress.post(PATH, signed_body(source, activity()))
            if status == 200:
                accepted.append(answer["id"])
            return status, headers, time.perf_counter() - started

        for _ in range(5):
            assert (await post())[0] == 200

        # When the memory alarm is raised: the broker blocks the connection once it publishes,
        # so a first webhook is in flight when the block comes
        async with memory_alarm() as alarm:
            in_flight = asyncio.ensure_future(post())
            await eventually(lambda: publisher.blocked.reason, timeout=ALARM_SECONDS,
                             what="the publisher blocked")  # fmt: skip
            refused = [await post() for _ in range(20)]

            # Then every webhook while blocked is refused with a 503 and Retry-After, at once
            assert [status for status, _, _ in refused] == [503] * 20
            assert all("Retry-After" in headers for _, headers, _ in refused)
            seconds = [elapsed for _, _, elapsed in refused]
            assert max(seconds) < REFUSED_WITHIN, seconds
            assert not in_flight.done()  # waits for its confirm
            # and the block is logged once, with the broker's reason, and exported
            blocks = logged(logs, "broker blocked publishing")
            assert [(b["component"], b["reason"]) for b in blocks] == [
                ("publisher", publisher.blocked.reason)
            ]
            assert "memory" in str(publisher.blocked.reason)
            assert blocked_gauge("publisher") == 1
        cleared = time.perf_counter()

        # And after the alarm clears, webhooks are accepted again
        while (await post())[0] != 200:
            assert time.perf_counter() - cleared < ALARM_SECONDS, "not accepted after the alarm"
        accept_after = time.perf_counter() - cleared
        since_restored = time.perf_counter() - alarm.restored
        for _ in range(5):
            assert (await post())[0] == 200
        # the one in flight when the block came was confirmed after it: 200, never 200 unconfirmed
        assert (await in_flight)[0] == 200
        assert publisher.blocked.reason is None
        assert blocked_gauge("publisher") == 0
        assert len(logged(logs, "broker unblocked publishing")) == 1

    # And every webhook answered 200 is in the handler's partitions: none lost, none extra
    queues = settings.handlers[0].queues
    await eventually(lambda: _depth_is(channel, queues, len(accepted)), what="all accepted stored")
    assert len(accepted) == len(set(accepted)) == 12
    print(f"\n503 while blocked: median {statistics.median(seconds) * 1000:.1f} ms, "
          f"max {max(seconds) * 1000:.1f} ms over {len(seconds)}; "
          f"accepted again {accept_after:.2f} s after the alarm was seen cleared, "
          f"{since_restored:.2f} s after the watermark was put back")  # fmt: skip


async def _depth_is(channel: AbstractChannel, queues: Sequence[str], expected: int) -> bool:
    found = await depth(channel, queues)
    assert found <= expected, f"{found} stored, only {expected} accepted"
    return found == expected


@pytest.mark.timeout(4 * ALARM_SECONDS + 60)
async def test_the_worker_delivers_through_a_block_and_loses_no_dead_letter_or_record(
    make_settings: MakeSettings,
    publish: Publish,
    start_worker: StartWorker,
    http_handler: HttpHandler,
    channel: AbstractChannel,
) -> None:
    # Given ten webhooks of ten keys queued, the first one's handler answering 400 (dead letter)
    settings = make_settings(handlers=[handler({"url": http_handler.url}, partitions=2)])
    events = [new_event(settings, invoice=invoice) for invoice in range(1, 11)]
    http_handler.plan(events[0].message_id, [400])
    await publish(settings, *events)
    the_handler = settings.handlers[0]

    async with memory_alarm():
        # When the worker starts while the broker's memory alarm is on
        running = await start_worker(settings)

        # Then the handler receives every message during the alarm
        await eventually(lambda: len(http_handler.requests) >= len(events), timeout=ALARM_SECONDS,
                         what="every message delivered")  # fmt: skip
        # while the worker's publishes (its outcome records, the dead letter) wait: the broker
        # blocks its publishing connection, not the one it consumes and acks on
        await eventually(lambda: running.worker.blocked.reason, timeout=ALARM_SECONDS,
                         what="the worker's publishing blocked")  # fmt: skip
        states = await eventually(_worker_blocked, timeout=ALARM_SECONDS,
                                  what="the broker's view of the worker's connections")  # fmt: skip
        assert states["relay worker"] != "blocked", states
        assert states["relay worker publishing"] == "blocked", states
        assert await depth(channel, the_handler.queues) == 0  # every one delivered: none ready
        assert blocked_gauge("worker") == 1

    # And after the alarm, each is acked once its outcome is recorded, and the dead letter is
    # kept, once: the worker's publishes waited through the block instead of timing out
    await eventually(lambda: _depth_is(channel, the_handler.queues, 0), timeout=ALARM_SECONDS,
                     what="partitions empty")  # fmt: skip
    await eventually(lambda: _depth_is(channel, [the_handler.dead_letter_queue], 1),
                     timeout=ALARM_SECONDS, what="the dead letter stored")  # fmt: skip
    assert {r.id for r in http_handler.requests} == {e.message_id for e in events}
    assert running.worker.blocked.reason is None


async def _worker_blocked() -> dict[str, str] | None:
    """The states of the connections, once one of the worker's is blocked (the management API
    updates them every few seconds)."""
    states = await connection_states()
    worker = (states.get("relay worker"), states.get("relay worker publishing"))
    return states if "blocked" in worker else None
