"""OpenTelemetry tracing: one trace per webhook, from the provider's request to the handler's
answer (README, "Observability"). The only module that imports OpenTelemetry.

On when the `relay[otel]` extra is installed and `OTEL_TRACES_EXPORTER` names an exporter
(`otlp`, sent over OTLP/HTTP as the other `OTEL_EXPORTER_OTLP_*` variables say, or `console`),
unless `OTEL_SDK_DISABLED` is true. `configure()` decides once, at start; callers check `ON`
before any work, so with tracing off the hot path creates no span, reads no header and pays one
attribute lookup.

What is traced:
- the ingress request (a server span, continuing the provider's `traceparent` if it sent a valid
  one), with events when the body is verified and validated and when the broker confirmed the
  publish; its W3C `traceparent`/`tracestate` go into the message's headers;
- in the worker, per message, the wait before its first attempt (a span from acceptance, its
  attributes split it: in the broker, behind its key, for the handler), then each attempt (a
  span, child of the request's, whose `traceparent` an HTTP handler receives).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from relay import wire

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from relay.providers import Event

log = structlog.get_logger()

ON = False  # set once by configure() or start()
_tracer: Tracer | None = None
_provider: Any = None  # the SDK's TracerProvider, while tracing is on

try:
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _propagator = TraceContextTextMapPropagator()
    INSTALLED = True
except ImportError:  # the `otel` extra is not installed: tracing stays off
    INSTALLED = False


def configure() -> None:
    """Turn tracing on if the environment asks for it (see the module's docstring)."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if not exporter or exporter == "none" or disabled:
        return
    if not INSTALLED:
        log.warning("tracing asked for, but relay[otel] is not installed: tracing is off",
                    exporter=exporter)  # fmt: skip
        return
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        start(OTLPSpanExporter())
    elif exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        start(ConsoleSpanExporter())
    else:
        log.warning("unknown OTEL_TRACES_EXPORTER (otlp or console): tracing is off",
                    exporter=exporter)  # fmt: skip


def start(exporter: SpanExporter, *, batch: bool = True) -> None:
    """Trace into `exporter`: in batches from a background thread (`OTEL_BSP_*` variables), or
    each span as it ends (tests). The service is `OTEL_SERVICE_NAME`, else `relay`; sampling
    follows `OTEL_TRACES_SAMPLER` (default: every trace a provider did not mark unsampled)."""
    global ON, _tracer, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": "relay"})
    _provider = TracerProvider(resource=resource)
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("relay")
    ON = True


def stop() -> None:
    """Export what is left and turn tracing off."""
    global ON, _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    ON, _tracer, _provider = False, None, None


def _tracer_of() -> Tracer:
    assert _tracer is not None
    return _tracer


# --- the ingress ------------------------------------------------------------------------------


class Request:
    """The span of a webhook request, current while it is handled."""

    def __init__(self, method: str, path: str, headers: Mapping[str, str], source: str) -> None:
        # a malformed or absent traceparent: a new trace
        parent = _propagator.extract(headers)
        self.span = _tracer_of().start_span(
            f"{method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path, "relay.source": source},
        )
        self._token = context.attach(trace.set_span_in_context(self.span, parent))

    def answered(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(StatusCode.ERROR)
        self.span.end()
        context.detach(self._token)


def verified(parse: Callable[..., Event]) -> Callable[..., Event]:
    """`parse` (a provider's: verify, then validate; the schemes interleave the two), marked on
    the request's span by a `relay.verified` event; the event it returns describes the span.

    Events, not child spans: a span costs the ingress about as much again as the request's own
    (docs/PERFORMANCE.md, "Tracing"), and their times say the same."""

    def traced(*args: Any) -> Event:
        event = parse(*args)
        span = trace.get_current_span()
        span.add_event("relay.verified")
        span.set_attributes(
            {
                "relay.message_id": event.message_id,
                "relay.event": event.name,
                "relay.key": event.key,
                "relay.routing_key": event.routing_key,
            }
        )
        return event

    return traced


def published(publish: Callable[[Event], Any]) -> Callable[[Event], Any]:
    """`publish`, whose message carries the request span's context (`carrier()`), marked on the
    span by a `relay.confirmed` event once the broker confirmed it."""

    async def traced(event: Event) -> None:
        await publish(event)
        trace.get_current_span().add_event("relay.confirmed")

    return traced


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers: `traceparent` and, if any, `tracestate`."""
    headers: dict[str, str] = {}
    _propagator.inject(headers)
    return headers


# --- the worker -------------------------------------------------------------------------------


class Waiting(Protocol):
    """What an attempt's span reads of a message in a partition's window (Delivery)."""

    message_id: str
    key: str
    body: bytes
    properties: Any  # headers, timestamp
    attempts: int  # tries in this process, this one included
    arrived: float  # time.time() it reached the window
    head_at: float  # time.time() it became its key's head

    @property
    def queue(self) -> str: ...

    @property
    def attempt(self) -> int: ...


class Verdict(Protocol):
    """What an attempt's span records of its outcome (relay.worker.delivery.Outcome)."""

    @property
    def verdict(self) -> str: ...

    @property
    def detail(self) -> str: ...

    @property
    def status(self) -> int | None: ...


class Attempt:
    """The span of one delivery attempt: started, and current in the calling task (a delivery
    task of its own) until the task ends, so that what the task logs carries its trace_id."""

    def __init__(self, handler: str, delivery: Waiting) -> None:
        headers = delivery.properties.headers or {}
        parent = _propagator.extract(
            {k: v for k in ("traceparent", "tracestate") if isinstance(v := headers.get(k), str)}
        )
        if delivery.attempts == 1:
            _wait(delivery, parent)
        self.span = _tracer_of().start_span(
            "relay.deliver",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "relay.handler": handler,
                "relay.partition": delivery.queue,
                "relay.message_id": delivery.message_id,
                "relay.key": delivery.key,
                "relay.attempt": delivery.attempt,
            },
        )
        context.attach(trace.set_span_in_context(self.span, parent))

    def ended(self, outcome: Verdict) -> None:
        self.span.set_attribute("relay.verdict", str(outcome.verdict))
        if outcome.status is not None:
            self.span.set_attribute("http.response.status_code", outcome.status)
        if str(outcome.verdict) != "success":
            self.span.set_status(StatusCode.ERROR, outcome.detail)
        self.span.end()


class _Untraced:
    def ended(self, outcome: Verdict) -> None:
        pass


UNTRACED = _Untraced()


def attempt(handler: str, delivery: Waiting) -> Attempt | _Untraced:
    """The span of `delivery`'s attempt now starting (`ended()` with its outcome)."""
    return Attempt(handler, delivery) if ON else UNTRACED


def _wait(delivery: Waiting, parent: Any) -> None:
    """A span from the message's acceptance to its first attempt in this process: its
    attributes say how long it was in the broker, behind older messages of its key, and ready
    but waiting for the handler (its concurrency, rate, or a parked handler's probe)."""
    now = time.time()
    accepted = wire.received_at(delivery.body, delivery.properties)
    since = accepted.timestamp() if accepted is not None else delivery.arrived
    head = delivery.head_at or delivery.arrived
    span = _tracer_of().start_span(
        "relay.wait",
        context=parent,
        start_time=int(since * 1e9),
        attributes={
            "relay.message_id": delivery.message_id,
            "relay.partition": delivery.queue,
            "relay.wait.broker_seconds": max(0.0, delivery.arrived - since),
            "relay.wait.key_seconds": max(0.0, head - delivery.arrived),
            "relay.wait.handler_seconds": max(0.0, now - head),
        },
    )
    span.end(end_time=int(now * 1e9))


# --- logs -------------------------------------------------------------------------------------


def add_trace_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: the trace_id of the current span, if one is (tracing on only)."""
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event["trace_id"] = format(span.trace_id, "032x")
    return event
