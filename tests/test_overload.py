"""Load shedding at the ingress (issue 21, point 1): while more than `ingress.max_accept_queue`
connections wait to be accepted (the process's CPU is the bottleneck), a new connection is answered
503 before its request is read and a webhook on an open connection 503 before its body is read;
beyond `ingress.max_in_flight` publishes in flight (the broker is), a new webhook is answered 503
with Retry-After at once and never published, while repeats and copies of an id being published
are answered as before. Figures: tests/bench/overload.py."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import structlog
import uvloop
from aio_pika.abc import AbstractChannel
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.errors import BrokerUnavailable
from relay.ingress import (
    ACCEPT_QUEUE,
    ACCEPTOR,
    OVERLOADED,
    SETTINGS,
    AcceptQueue,
    LimitedSite,
    create_app,
    not_ready,
    sheds,
)
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
PROBE = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


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


# --- the accept queue, on loopback sockets (milliseconds) ---------------------------------


def test_the_accept_queue_counts_the_connections_waiting_and_is_behind_beyond_its_bound() -> None:
    # Given a listening socket nobody accepts from, watched with a bound of 3
    queue = AcceptQueue(3)
    with socket.create_server(("127.0.0.1", 0), backlog=50) as listening:
        queue.watch([listening])
        port = listening.getsockname()[1]
        with structlog.testing.capture_logs() as logs:
            # When 3, then 5 connections wait
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            at_bound = queue.behind()
            clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            beyond = (queue.waiting(), queue.behind(), queue.behind())
            # And all but one are accepted
            for _ in range(4):
                listening.accept()[0].close()
            after = queue.behind()
        for client in clients:
            client.close()

    # Then it is behind only beyond the bound, exported, and logged once each way
    assert not at_bound
    assert beyond == (5, True, True)
    assert not after
    assert metrics.ACCEPT_QUEUE._value.get() == 1
    assert metrics.MAX_ACCEPT_QUEUE._value.get() == 3
    assert [log["event"] for log in logs] == [
        "shedding load: connections waiting to be accepted, answering 503",
        "shedding stopped: accept queue short again",
    ]


async def test_once_the_listening_socket_closed_nothing_waits_and_nothing_raises() -> None:
    # Given a watched listening socket of a server that stopped (a drain: the requests it let in
    # are still being answered, and each answer reads the queue)
    queue = AcceptQueue(3)
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    queue.watch(server.sockets)
    server.close()
    await server.wait_closed()

    # Then the queue reads empty
    assert queue.waiting() == 0
    assert not queue.behind()


async def test_while_connections_wait_a_webhook_on_an_open_connection_is_503_before_its_body(
    offline: tuple[Ingress, GatedFake], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an ingress with more connections waiting to be accepted than its bound
    ingress, publisher = offline
    before = requests_total(await metrics_text(ingress), "shed")
    queue = ingress.app[ACCEPT_QUEUE]
    monkeypatch.setattr(queue, "waiting", lambda: queue.max_waiting + 1)
    source = ingress.app[SETTINGS].sources[0]

    # When a webhook arrives on an open connection, and a probe
    status, answer, headers = await ingress.post(PATH, signed_body(source, activity()))
    async with ingress.client.get("/healthz") as probe:
        probe_status = probe.status

    # Then the webhook is 503 with Retry-After, closing its connection, never published,
    # counted as shed for its source; the probe is answered
    assert (status, answer) == (503, {"error": OVERLOADED})
    assert int(headers["Retry-After"]) > 0
    assert headers["Connection"] == "close"
    assert publisher.waiting == 0
    assert not publisher.published
    assert requests_total(await metrics_text(ingress), "shed") == before + 1
    assert probe_status == 200


async def test_with_admin_port_while_connections_wait_a_webhook_let_in_is_served_then_closed(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an ingress with admin_port set (connections are shed as they are accepted) and more
    # connections waiting to be accepted than its bound
    settings = make_settings(ingress={"admin_port": 1}, source={"tolerance_seconds": 300})
    publisher = FakePublisher()
    async with running_ingress(settings, publisher=publisher) as ingress:
        queue = ingress.app[ACCEPT_QUEUE]
        monkeypatch.setattr(queue, "waiting", lambda: queue.max_waiting + 1)

        # When a webhook arrives on a connection let in
        status, answer, headers = await ingress.post(
            PATH, signed_body(settings.sources[0], activity())
        )

    # Then it is accepted, and its connection closed: its next request waits in the accept
    # queue like the others' rather than pass them
    assert (status, answer["status"]) == (200, "accepted")
    assert headers["Connection"] == "close"
    assert len(publisher.published) == 1


def test_under_a_saturated_loop_the_connections_beyond_the_bound_get_the_cheap_503(
    make_settings: MakeSettings,
) -> None:
    # On uvloop, as `relay ingress` runs: it makes each connection's protocol as it accepts it,
    # so the accept queue read then is what still waits (asyncio accepts a batch first).
    # Given 6 clients connected while the ingress's loop is busy (all wait to be accepted)
    settings = make_settings(ingress={"max_accept_queue": 2, "admin_port": 1})
    before = metrics.REQUESTS.labels("", metrics.SHED)._value.get()
    answers = uvloop.run(saturated(settings, clients=6))

    # Then those accepted while more than 2 still waited behind them (the first 3) got a JSON
    # 503 with Retry-After before any request was read, counted as shed with no source; the
    # last 3 were let in
    assert [bool(answer) for answer in answers] == [True] * 3 + [False] * 3, answers
    for answer in answers[:3]:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nRetry-After: " in head
        assert orjson.loads(body) == {"error": OVERLOADED}
    assert metrics.REQUESTS.labels("", metrics.SHED)._value.get() == before + 3


async def saturated(settings: Settings, clients: int) -> list[bytes]:
    """What `clients` read within a second of being accepted by the ingress's site, having all
    connected while its loop was busy (held, as a backlog of requests holds it); empty for a
    connection let in (it waits for its request)."""
    app = create_app(settings, FakePublisher())
    runner = web.AppRunner(app)
    await runner.setup()
    site = LimitedSite(runner, "127.0.0.1", 0, max_connections=100, shedding=sheds(app))
    all_connected = threading.Event()

    def connect() -> list[bytes]:
        connected = [
            socket.create_connection(("127.0.0.1", site.port), timeout=10) for _ in range(clients)
        ]
        all_connected.set()
        answers = []
        for client in connected:
            client.settimeout(1.0)
            try:
                answers.append(read_all(client))
            except TimeoutError:
                answers.append(b"")
            client.close()
        return answers

    try:
        await site.start()
        app[ACCEPT_QUEUE].watch(site.sockets)
        await eventually(lambda: not not_ready(app), what="ingress ready")
        # Given the loop busy until every client has connected
        connecting = asyncio.ensure_future(asyncio.to_thread(connect))
        asyncio.get_running_loop().call_soon(all_connected.wait, 10)
        return await connecting
    finally:
        await runner.cleanup()


def exchange(connection: socket.socket, request: bytes) -> bytes:
    """One request and its answer's head and body, on a blocking socket."""
    connection.sendall(request)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536) or b"\r\n\r\n"
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")), 0
    )  # fmt: skip
    while len(body) < length and (chunk := connection.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def read_all(connection: socket.socket) -> bytes:
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


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
