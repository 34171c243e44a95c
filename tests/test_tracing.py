"""Tracing (relay/tracing.py): one trace per webhook across the ingress, the broker and the
worker, into the SDK's in-memory exporter, over the real broker; and nothing at all when off."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from relay import tracing, wire
from relay.settings import Settings
from tests.conftest import MakeSettings, StartWorker
from tests.handlers_for_tests import HttpHandler
from tests.support import activity, eventually, handler, running_ingress, signed_body

PATH = "/webhooks/envoice"
PROVIDER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PROVIDER_TRACEPARENT = f"00-{PROVIDER_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, each span exported as it ends into memory; off again after the test."""
    exporter = InMemorySpanExporter()
    tracing.start(exporter, batch=False)
    yield exporter
    tracing.stop()


@pytest.fixture
async def bound(channel: AbstractChannel) -> AsyncIterator[Any]:
    """`await bound(settings)`: a queue of the test's own bound to the exchange, as a
    downstream service binds one, to read the messages as they are on the wire."""
    queues: list[AbstractQueue] = []

    async def bind(settings: Settings) -> AbstractQueue:
        queue = await channel.declare_queue(f"test-tracing-{uuid.uuid4().hex[:8]}", exclusive=True)
        await queue.bind(settings.broker.exchange, "#")
        queues.append(queue)
        return queue

    yield bind
    for queue in queues:
        await queue.delete(if_unused=False, if_empty=False)


async def wire_headers(queue: AbstractQueue) -> dict[str, Any]:
    message = await eventually(lambda: queue.get(fail=False), what="the message on the wire")
    assert isinstance(message, aio_pika.abc.AbstractIncomingMessage)
    await message.ack()
    return dict(message.headers)


def trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{trace_id(span)}-{span.context.span_id:016x}-{span.context.trace_flags:02x}"


@pytest.mark.rabbit
async def test_a_webhook_retried_twice_is_one_trace_from_ingress_to_handler(
    make_settings: MakeSettings,
    start_worker: StartWorker,
    http_handler: HttpHandler,
    spans: InMemorySpanExporter,
    bound: Any,
) -> None:
    # Given a handler that answers 503 twice, then 200
    settings = make_settings(handlers=[handler({"url": http_handler.url})])
    source = settings.sources[0]
    event_id = uuid.uuid4().int % 10**12
    message_id = f"envoice:{event_id}"
    http_handler.plan(message_id, [503, 503, 200])
    async with running_ingress(settings) as ingress:
        wire_queue = await bound(settings)
        await start_worker(settings)

        # When the provider sends the webhook (no traceparent)
        status, answer, _ = await ingress.post(PATH, signed_body(source, activity(Id=event_id)))
        assert (status, answer) == (200, {"status": "accepted", "id": message_id})
        await eventually(lambda: http_handler.accepted() == [message_id], what="delivered")
        done = await eventually(
            lambda: len(named(spans.get_finished_spans(), "relay.deliver")) == 3 or None,
            what="three attempt spans",
        )
        assert done

    # Then one trace: the request (verified, then confirmed), the wait and three attempts
    finished = spans.get_finished_spans()
    assert len({trace_id(s) for s in finished}) == 1
    (request,) = named(finished, f"POST {PATH}")
    (wait,) = named(finished, "relay.wait")
    attempts = sorted(named(finished, "relay.deliver"), key=lambda s: s.start_time or 0)
    assert len(finished) == 5
    assert request.parent is None
    assert request.attributes is not None
    assert request.attributes["relay.message_id"] == message_id
    assert request.attributes["relay.source"] == "envoice"
    assert request.attributes["relay.event"] == "paid"
    assert request.attributes["relay.routing_key"] == "envoice.paid"
    assert request.attributes["http.response.status_code"] == 200
    assert [e.name for e in request.events] == ["relay.verified", "relay.confirmed"]
    assert [parent_id(s) for s in (wait, *attempts)] == [span_id(request)] * 4
    assert (wait.end_time or 0) <= (attempts[0].start_time or 0)
    assert wait.attributes is not None
    assert wait.attributes["relay.wait.broker_seconds"] >= 0  # type: ignore[operator]
    expected = [("transient", 503, 1), ("transient", 503, 2), ("success", 200, 3)]
    seen = []
    for span in attempts:
        attributes = span.attributes or {}
        assert attributes["relay.handler"] == settings.handlers[0].name
        assert attributes["relay.message_id"] == message_id
        assert attributes["relay.partition"] == settings.handlers[0].queue(0)
        seen.append(
            (
                attributes["relay.verdict"],
                attributes["http.response.status_code"],
                attributes["relay.attempt"],
            )
        )
    assert seen == expected

    # And the message carried the request's context; each request to the handler its attempt's
    assert (await wire_headers(wire_queue))["traceparent"] == traceparent_of(request)
    received = [r.headers["traceparent"] for r in http_handler.of(message_id)]
    assert received == [traceparent_of(a) for a in attempts]


@pytest.mark.rabbit
async def test_the_providers_traceparent_is_continued_and_a_malformed_one_ignored(
    make_settings: MakeSettings, spans: InMemorySpanExporter, bound: Any
) -> None:
    settings = make_settings(handlers=[handler({"url": "http://127.0.0.1:9/"})])
    source = settings.sources[0]
    async with running_ingress(settings) as ingress:
        wire_queue = await bound(settings)
        # Given a provider that sends its own traceparent: the request continues its trace
        headers = {"traceparent": PROVIDER_TRACEPARENT, "tracestate": "vendor=opaque"}
        status, _, _ = await ingress.post(PATH, signed_body(source, activity()), headers)
        assert status == 200
        (request,) = named(spans.get_finished_spans(), f"POST {PATH}")
        assert trace_id(request) == PROVIDER_TRACE
        assert parent_id(request) == 0x00F067AA0BA902B7
        on_wire = await wire_headers(wire_queue)
        assert on_wire["traceparent"].split("-")[1] == PROVIDER_TRACE
        assert on_wire["tracestate"] == "vendor=opaque"
        spans.clear()

        # When one sends a malformed traceparent: accepted all the same, in a new trace
        for malformed in ("00-zz-00f067aa0ba902b7-01", "garbage", "00-" + "0" * 32 + "-" * 20):
            status, _, _ = await ingress.post(
                PATH, signed_body(source, activity()), {"traceparent": malformed}
            )
            assert status == 200
            (request,) = named(spans.get_finished_spans(), f"POST {PATH}")
            assert request.parent is None
            assert trace_id(request) != PROVIDER_TRACE
            assert (await wire_headers(wire_queue))["traceparent"].split("-")[1] == trace_id(
                request
            )
            spans.clear()


@pytest.mark.rabbit
async def test_with_tracing_off_no_span_is_made_and_nothing_is_added_to_the_wire(
    make_settings: MakeSettings,
    start_worker: StartWorker,
    http_handler: HttpHandler,
    bound: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given tracing off (no OTEL_TRACES_EXPORTER), with every way to start a span watched
    assert not tracing.ON
    started: list[str] = []
    monkeypatch.setattr(tracing, "_tracer_of", lambda: started.append("span"))
    settings = make_settings(handlers=[handler({"url": http_handler.url})])
    source = settings.sources[0]
    async with running_ingress(settings) as ingress:
        wire_queue = await bound(settings)
        await start_worker(settings)

        # When a webhook with a traceparent is delivered
        status, answer, _ = await ingress.post(
            PATH, signed_body(source, activity()), {"traceparent": PROVIDER_TRACEPARENT}
        )
        assert status == 200
        await eventually(lambda: http_handler.accepted() == [answer["id"]], what="delivered")

    # Then no span was started, the message has relay's headers only, the handler no traceparent
    assert started == []
    assert set(await wire_headers(wire_queue)) == {
        wire.SOURCE_HEADER, wire.EVENT_HEADER, wire.KEY_HEADER, wire.BUCKET_HEADER,
    }  # fmt: skip
    assert "traceparent" not in http_handler.requests[0].headers


def test_log_lines_carry_the_trace_id_of_the_current_span(spans: InMemorySpanExporter) -> None:
    request = tracing.Request("POST", PATH, {"traceparent": PROVIDER_TRACEPARENT}, "envoice")
    inside = tracing.add_trace_id(None, "info", {"event": "delivered"})
    request.answered(200)
    outside = tracing.add_trace_id(None, "info", {"event": "delivered"})

    assert inside == {"event": "delivered", "trace_id": PROVIDER_TRACE}
    assert outside == {"event": "delivered"}


@pytest.mark.parametrize(
    ("environment", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_tracing_is_on_when_the_environment_names_an_exporter(
    environment: dict[str, str], on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    try:
        tracing.configure()
        assert tracing.ON is on
    finally:
        tracing.stop()
