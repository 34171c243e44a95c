"""Load shedding at the ingress (issue 21, point 1): beyond `ingress.max_in_flight` publishes in
flight, a new webhook is answered 503 with Retry-After at once and never published; repeats and
copies of an id being published are answered as before. Figures: tests/bench/overload.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from aio_pika.abc import AbstractChannel
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.errors import BrokerUnavailable
from relay.ingress import ACCEPTOR, OVERLOADED, SETTINGS, LimitedSite
from relay.providers import Event
from relay.publisher import Publisher
from relay.settings import Settings
from tests.conftest import MakeSettings
from tests.support import (
    FakePublisher,
    Ingress,
    activity,
    declare_topology,
    eventually,
    now_timestamp,
    running_ingress,
    signed_body,
)

PATH = "/webhooks/envoice"
BOUND = 4
BILLING = {
    "name": "billing",
    "events": ["envoice.#"],
    "url": "http://127.0.0.1:9/",
    "partitions": 1,
}
Answer = tuple[int, dict[str, object], dict[str, str]]


class HeldPublisher(Publisher):
    """The broker publisher, whose confirmed publishes are held until `release` is set: the
    message is in its queue, the request still waits, as when confirms are slow."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.release = asyncio.Event()
        self.held = 0

    async def publish(self, event: Event) -> None:
        await super().publish(event)
        self.held += 1
        await self.release.wait()


class GatedFake(FakePublisher):
    """The fake publisher, each publish held until `release` is set (or failing with `error`)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.waiting = 0

    async def publish(self, event: Event) -> None:
        self.waiting += 1
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1
        await super().publish(event)


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return sample.value
    return 0.0


async def metrics_text(ingress: Ingress) -> str:
    async with ingress.client.get("/metrics") as response:
        return await response.text()


def requests_total(text: str, status: str) -> float:
    labels = {"source": "envoice", "status": status}
    return metric(text, "relay_ingress_requests_total", labels)


async def posts(ingress: Ingress, bodies: list[bytes]) -> list[asyncio.Task[Answer]]:
    return [asyncio.ensure_future(ingress.post(PATH, body)) for body in bodies]


@pytest.fixture
async def offline(make_settings: MakeSettings) -> AsyncIterator[tuple[Ingress, GatedFake]]:
    settings = make_settings(ingress={"max_in_flight": BOUND}, source={"tolerance_seconds": 300})
    publisher = GatedFake()
    async with running_ingress(settings, publisher=publisher) as ingress:
        yield ingress, publisher


# --- the bound, on a fake publisher (milliseconds) -----------------------------------------


async def test_beyond_the_bound_a_new_webhook_is_503_at_once_and_not_published(
    offline: tuple[Ingress, GatedFake],
) -> None:
    ingress, publisher = offline
    src = ingress.app[SETTINGS].sources[0]
    # Given BOUND publishes in flight
    held = await posts(ingress, [signed_body(src, activity()) for _ in range(BOUND)])
    await eventually(lambda: publisher.waiting == BOUND, what="BOUND publishes in flight")
    text = await metrics_text(ingress)
    assert metric(text, "relay_ingress_publishes_in_flight") == BOUND
    assert metric(text, "relay_ingress_max_in_flight") == BOUND

    # When one more new webhook arrives
    status, answer, headers = await ingress.post(PATH, signed_body(src, activity()))

    # Then it is 503 with Retry-After while the others still wait, and nothing more is published
    assert status == 503, answer
    assert "error" in answer
    assert int(headers["Retry-After"]) > 0
    assert publisher.waiting == BOUND
    assert not any(task.done() for task in held)
    publisher.release.set()
    assert [a[1]["status"] for a in await asyncio.gather(*held)] == ["accepted"] * BOUND
    assert len(publisher.published) == BOUND


async def test_a_repeat_or_a_copy_of_an_id_in_flight_is_not_shed(
    offline: tuple[Ingress, GatedFake],
) -> None:
    ingress, publisher = offline
    src = ingress.app[SETTINGS].sources[0]
    publisher.release.set()
    done = activity()
    assert (await ingress.post(PATH, signed_body(src, done)))[1]["status"] == "accepted"
    publisher.release.clear()
    # Given the bound reached, one of the ids in flight known
    in_flight = [activity() for _ in range(BOUND)]
    held = await posts(ingress, [signed_body(src, act) for act in in_flight])
    await eventually(lambda: publisher.waiting == BOUND, what="BOUND publishes in flight")

    # When a repeat of an accepted id and a copy of an id in flight arrive
    repeat = await ingress.post(PATH, signed_body(src, done, timestamp=now_timestamp(1)))
    copy = await posts(ingress, [signed_body(src, in_flight[0], timestamp=now_timestamp(1))])

    # Then the repeat is a duplicate now, and the copy waits for the publish: a duplicate after
    assert (repeat[0], repeat[1]["status"]) == (200, "duplicate")
    publisher.release.set()
    assert [(s, a["status"]) for s, a, _ in await asyncio.gather(*copy)] == [(200, "duplicate")]
    await asyncio.gather(*held)
    assert len(publisher.published) == 1 + BOUND


async def test_a_failed_publish_frees_its_place_and_shedding_stops_once_places_free(
    offline: tuple[Ingress, GatedFake],
) -> None:
    ingress, publisher = offline
    src = ingress.app[SETTINGS].sources[0]
    held = await posts(ingress, [signed_body(src, activity()) for _ in range(BOUND)])
    await eventually(lambda: publisher.waiting == BOUND, what="BOUND publishes in flight")
    assert (await ingress.post(PATH, signed_body(src, activity())))[0] == 503
    assert ingress.app[ACCEPTOR].shedding

    # When the publishes in flight fail (the broker went away)
    publisher.error = BrokerUnavailable("broker gone")  # raised once released
    publisher.release.set()
    assert [status for status, _, _ in await asyncio.gather(*held)] == [503] * BOUND

    # Then no place is left taken: shedding stopped, the gauge is back to 0, the next is accepted
    assert not ingress.app[ACCEPTOR].shedding
    assert metric(await metrics_text(ingress), "relay_ingress_publishes_in_flight") == 0
    publisher.error = None
    assert (await ingress.post(PATH, signed_body(src, activity())))[1]["status"] == "accepted"


async def test_while_shedding_a_new_connection_is_503_before_its_request_is_read() -> None:
    # Given a site whose ingress sheds
    shedding = True
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = LimitedSite(runner, "127.0.0.1", 0, max_connections=10, shedding=lambda: shedding)
    try:
        await site.start()
        before = metrics.REQUESTS.labels("", metrics.SHED)._value.get()

        # When a client connects (and sends nothing)
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        answer = await reader.read()  # the server closes
        writer.close()

        # Then it is a JSON 503 with Retry-After, counted as shed with no source
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nRetry-After: " in head
        assert orjson.loads(body) == {"error": OVERLOADED}
        assert metrics.REQUESTS.labels("", metrics.SHED)._value.get() == before + 1

        # And once shedding stops, connections are served again
        shedding = False
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 404 ")
        writer.close()
    finally:
        await runner.cleanup()


# --- on the broker --------------------------------------------------------------------------


@pytest.mark.rabbit
async def test_overload_sheds_the_extra_webhooks_and_stores_every_accepted_one(
    make_settings: MakeSettings, channel: AbstractChannel
) -> None:
    settings = make_settings(
        handlers=[BILLING], ingress={"max_in_flight": BOUND}, source={"tolerance_seconds": 300}
    )
    await declare_topology(settings)
    publisher = HeldPublisher(settings)
    source = settings.sources[0]
    async with running_ingress(settings, publisher=publisher) as ingress:
        before = await metrics_text(ingress)
        # Given BOUND webhooks published to the broker, their answers held
        held = await posts(ingress, [signed_body(source, activity()) for _ in range(BOUND)])
        # (30 s: another test may hold a broker memory alarm for a few seconds)
        await eventually(lambda: publisher.held == BOUND, timeout=30, what="BOUND confirmed")

        # When 3 x BOUND more arrive at once
        started = time.monotonic()
        extra = await asyncio.gather(
            *await posts(ingress, [signed_body(source, activity()) for _ in range(3 * BOUND)])
        )
        elapsed = time.monotonic() - started

        # Then every one is 503 with Retry-After, answered while the held ones still wait
        assert [status for status, _, _ in extra] == [503] * (3 * BOUND)
        assert all(int(headers["Retry-After"]) > 0 for _, _, headers in extra)
        assert not any(task.done() for task in held)
        assert elapsed < 2.0, elapsed
        publisher.release.set()
        accepted = [answer["status"] for _, answer, _ in await asyncio.gather(*held)]
        after = await metrics_text(ingress)

    # And exactly those 503s are counted as shed (not as the broker's 503s), and only the
    # accepted ones are stored
    assert accepted == ["accepted"] * BOUND
    assert requests_total(after, "shed") - requests_total(before, "shed") == 3 * BOUND
    assert requests_total(after, "503") == requests_total(before, "503")
    queue = await channel.declare_queue(settings.handlers[0].queues[0], passive=True)
    assert queue.declaration_result.message_count == BOUND
