"""`relay bench`: load an ingress with signed webhooks; accepted/s, latency percentiles, answers.

Each of --concurrency keep-alive connections is a lean HTTP/1.1 client on asyncio.Protocol
(`Connection`: a request in one write, the answer read by `parse_response`): a few microseconds
a request, where aiohttp's client costs ~200. Closed loop by default: a connection sends its next
webhook once the last is answered. With --rate the loop is open: request i is due at start +
i / rate and its latency counts from then, so a stalling server is charged for the requests that
waited behind it (no coordinated omission).

Signing costs more than sending (~40 us an Envoice webhook), so webhooks are signed before the
clock starts: all of --count, rate x duration with --rate, else PREFILL_RATE a second, at most
MAX_PREFILL; the report counts those signed during the run, and gives this process's CPU per
request: near a full core, the rate measured is relay bench's own limit.

--e2e measures delivery too: a temporary handler `bench-<hex>` of the source's events POSTs to a
sink, both consumed (relay's Worker) and served in this process; each key's webhooks go one
after another on one connection, so the order they reach the sink is checked against the order
they were accepted. Its queues and exchange are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import re
import ssl
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

import aio_pika.exceptions
import orjson
from aio_pika.abc import AbstractConnection
from aiohttp import web

from relay import topology
from relay.broker import connect
from relay.errors import ConfigError, OptionError, RelayError
from relay.providers import PROVIDERS, Request
from relay.settings import HandlerSettings, Settings, SourceSettings
from relay.worker import Worker

DEFAULT_SECONDS = 10.0
PREFILL_RATE = 15_000  # webhooks a second signed ahead for a closed loop with --duration
MAX_PREFILL = 200_000  # ~130 MB of requests
REQUEST_TIMEOUT_SECONDS = 30.0
FAILED_PAUSE_SECONDS = 0.1  # after a failed request, before its connection tries again
E2E_PARTITIONS = 2
WORKER_SECONDS = 30.0  # for the worker to start consuming, and to stop
DELIVERY_SECONDS = 60.0  # after the load, for the sink to get every accepted webhook
ERRORS_KEPT = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(default_log_level="warning")  # --e2e's worker would log every delivery
    parser.add_argument("--url", help="default: the config's ingress port and source path")
    parser.add_argument("--source", help="source name (default: the first source)")
    parser.add_argument("--concurrency", type=_positive(int), default=50, help="connections (50)")
    parser.add_argument(
        "--rate",
        type=_positive(float),
        help="open loop: R requests a second, latency counted from when each was due "
        "(default: closed loop, each connection sends when answered)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--count", type=_positive(int), help="send N webhooks")
    amount.add_argument(
        "--duration", type=_positive(float), help=f"send for S seconds ({DEFAULT_SECONDS:g})"
    )
    parser.add_argument(
        "--keys", type=_positive(int), default=100, help="ordering keys (invoices) to use (100)"
    )
    parser.add_argument("--json", action="store_true", help="the report as one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="deliver through a temporary handler to a sink in this process: delivered/s, "
        "end-to-end latency, losses, order (needs the broker)",
    )


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = kind(value)
        if not number > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
        return number

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


async def run(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.sources:
        raise ConfigError("sources: none configured")
    source = settings.source(args.source) if args.source else settings.sources[0]
    target = Endpoint.from_url(args.url or f"http://127.0.0.1:{settings.ingress.port}{source.path}")
    seconds = None if args.count else args.duration or DEFAULT_SECONDS
    load = Load(concurrency=args.concurrency, keys=args.keys, count=args.count, seconds=seconds,
                rate=args.rate, ordered=args.e2e)  # fmt: skip
    signer = Signer(source, target, load.keys)
    if not args.quiet:
        print(f"signing {load.to_sign:,} webhooks before the clock starts", file=sys.stderr)
    signer.prepare(load.to_sign)
    report = BenchReport()
    if args.e2e:
        await end_to_end(settings, source, load, target, signer, report, quiet=args.quiet)
    else:
        await bench(load, target, signer, report, quiet=args.quiet)
    print(orjson.dumps(report.as_dict()).decode() if args.json else report.render())
    for error in report.errors:
        print(f"  {error}", file=sys.stderr)
    return 0 if report.ok else 1


# --- HTTP -------------------------------------------------------------------------------------


class BadReply(RelayError):
    """The target's answer is not an HTTP/1.x response that relay bench reads."""


class Reply(NamedTuple):
    status: int
    body: bytes
    close: bool  # the server closes the connection after it
    size: int  # the bytes of the buffer it took


_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d\d\d)")
_HEADER = re.compile(rb"\r\n(content-length|connection|transfer-encoding)[ \t]*:[ \t]*([^\r]*)")


def parse_response(data: bytes | bytearray, *, eof: bool = False) -> Reply | None:
    """The first response in `data`; None while incomplete. With `eof` (the server closed the
    connection) an answer without Content-Length ends there, and an incomplete one raises."""
    end = data.find(b"\r\n\r\n")
    status_line = _STATUS_LINE.match(data)
    if end < 0 or status_line is None:
        if eof or (status_line is None and len(data) >= 12):
            raise BadReply(f"not an HTTP/1.x answer: {bytes(data[:40])!r}")
        return None
    status, close, length = int(status_line[2]), status_line[1] == b"0", None
    for name, value in _HEADER.findall(bytes(data[:end]).lower()):
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit():
                raise BadReply(f"bad Content-Length {value[:20]!r}")
            length = int(value)
        elif name == b"connection":
            close = value == b"close"
        else:
            raise BadReply("Transfer-Encoding is not read: answer with a Content-Length")
    start = end + 4
    if length is None and (status < 200 or status in (204, 304)):
        length = 0
    elif length is None and eof:
        length, close = len(data) - start, True
    if length is None or len(data) - start < length:
        if eof:
            raise BadReply("connection closed in the middle of an answer")
        return None
    return Reply(status, bytes(data[start : start + length]), close, start + length)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the webhooks go."""

    host: str
    port: int
    path: str
    authority: str  # the Host header
    tls: ssl.SSLContext | None

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OptionError(f"--url: expected an http:// or https:// URL, got {url!r}")
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        port = parts.port or (443 if tls else 80)
        return cls(parts.hostname, port, path, parts.netloc.rpartition("@")[2], tls)

    def request(self, sample: Request) -> bytes:
        """A sample's whole POST, ready to write."""
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.authority}",
                f"Content-Length: {len(sample.body)}"]  # fmt: skip
        head += [f"{k}: {v}" for k, v in sample.headers.items() if k.lower() != "content-length"]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + sample.body


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: a request written whole, then its answer read."""

    def __init__(self) -> None:
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Reply] | None = None

    @classmethod
    async def open(cls, target: Endpoint) -> Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(cls, target.host, target.port, ssl=target.tls)
        return connection

    async def post(self, request: bytes) -> Reply:
        assert self._transport is not None
        waiter: asyncio.Future[Reply] = self._loop.create_future()
        self._waiter = waiter
        late = TimeoutError(f"no answer within {REQUEST_TIMEOUT_SECONDS:g} s")
        timer = self._loop.call_later(REQUEST_TIMEOUT_SECONDS, self._fail, late)
        self._transport.write(request)
        try:
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._read(eof=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._read(eof=True)

    def _read(self, *, eof: bool) -> None:
        if self._waiter is None or self._waiter.done():
            return
        try:
            answer = parse_response(self._buffer, eof=eof)
        except BadReply as exc:
            self._fail(exc)
            return
        if answer is not None:
            del self._buffer[: answer.size]
            self._waiter.set_result(answer)
            if answer.close:
                self.close()

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()


# --- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    """`count` webhooks or `seconds` of them, `rate` a second (None: as fast as `concurrency`
    connections are answered), over `keys` ordering keys."""

    concurrency: int
    keys: int
    count: int | None = None
    seconds: float | None = None
    rate: float | None = None
    ordered: bool = False  # each key on one connection, its webhooks one after another

    @property
    def connections(self) -> int:
        return min(self.concurrency, self.keys) if self.ordered else self.concurrency

    @property
    def to_sign(self) -> int:
        """Webhooks to sign before the clock starts."""
        expected = self.count or math.ceil((self.rate or PREFILL_RATE) * (self.seconds or 0))
        return min(expected, MAX_PREFILL)


class Signer:
    """A source's signed webhooks as whole requests, per ordering key; made ahead if asked."""

    def __init__(self, source: SourceSettings, target: Endpoint, keys: int) -> None:
        self._source, self._target = source, target
        self._sample = PROVIDERS[source.scheme].sample
        self._ids = itertools.count(time.time_ns() // 1000)  # unique across runs: no duplicates
        self._ready: list[deque[bytes]] = [deque() for _ in range(keys)]
        self.late = 0  # signed during the run, once those made ahead ran out

    def prepare(self, count: int) -> None:
        for i in range(count):
            self._ready[i % len(self._ready)].append(self._sign(i % len(self._ready)))

    def take(self, key: int) -> bytes:
        if ready := self._ready[key]:
            return ready.popleft()
        self.late += 1
        return self._sign(key)

    def _sign(self, key: int) -> bytes:
        event_id = next(self._ids)
        sample = self._sample(self._source, event_id=event_id, key=key + 1, now=time.time())
        return self._target.request(sample)


async def send_load(load: Load, target: Endpoint, signer: Signer, report: BenchReport) -> None:
    """Send `load` to `target`, recording each answer in `report`."""
    start = time.perf_counter()
    end = start + load.seconds if load.seconds is not None else math.inf
    indexes, slots = itertools.count(), load.connections

    async def send(slot: int) -> None:
        http: Connection | None = None
        own = itertools.cycle(range(slot, load.keys, slots)) if load.ordered else None
        for i in indexes:
            due = start + i / load.rate if load.rate else time.perf_counter()
            if due >= end or (load.count is not None and i >= load.count):
                break
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)  # uvloop's timers fire up to 1 ms early
            key = next(own) if own is not None else i % load.keys
            request = signer.take(key)
            started = max(due, time.perf_counter())
            try:
                if http is None or http.closed:
                    http = await Connection.open(target)
                answer = await http.post(request)
            except (OSError, TimeoutError, BadReply) as exc:
                report.failed(exc)
                await asyncio.sleep(FAILED_PAUSE_SECONDS)
                continue
            report.answered(answer, key, started, time.perf_counter())
        if http is not None:
            http.close()

    cpu = time.process_time()
    await asyncio.gather(*(send(slot) for slot in range(slots)))
    report.seconds = time.perf_counter() - start
    report.cpu_seconds = time.process_time() - cpu
    report.signed_late = signer.late


@contextlib.asynccontextmanager
async def progress(line: Callable[[], str], *, quiet: bool) -> AsyncIterator[None]:
    """`line()` on stderr once a second during the block: rewritten in place on a terminal."""
    terminal, shown = sys.stderr.isatty(), False

    async def show() -> None:
        nonlocal shown
        while True:
            await asyncio.sleep(1)
            sys.stderr.write(f"\r{line():<79}" if terminal else f"{line()}\n")
            sys.stderr.flush()
            shown = True

    task = None if quiet else asyncio.create_task(show())
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
        if terminal and shown:
            sys.stderr.write("\n")


def _load_line(report: BenchReport) -> Callable[[], str]:
    start, last = time.perf_counter(), 0

    def line() -> str:
        nonlocal last
        answers = report.answers
        accepted, errors = answers["accepted"], answers.total() - answers["accepted"]
        per_second, last = accepted - last, accepted
        return (f"{time.perf_counter() - start:4.0f} s  sent {answers.total():,}  accepted/s "
                f"{per_second:,}  not accepted {errors:,}")  # fmt: skip

    return line


async def bench(
    load: Load, target: Endpoint, signer: Signer, report: BenchReport, *, quiet: bool
) -> None:
    async with progress(_load_line(report), quiet=quiet):
        await send_load(load, target, signer, report)


# --- the report -------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank `q`th percentile of sorted values; NaN (JSON null) of none."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(seconds: list[float], prefix: str = "") -> dict[str, float]:
    ordered = sorted(seconds)
    points = {"p50": 50, "p95": 95, "p99": 99, "max": 100}
    return {f"{prefix}{p}_ms": round(percentile(ordered, q) * 1000, 3) for p, q in points.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Arrivals:
    """How the accepted webhooks reached the sink (--e2e)."""

    delivered: int  # accepted webhooks that arrived at least once
    seconds: float  # from the start of the load to the last first arrival
    latencies: list[float]  # seconds, from sending to the first arrival
    lost: int
    duplicates: int  # arrivals beyond the first of a webhook
    order_violations: int  # keys whose webhooks first arrived in another order than accepted

    def as_dict(self) -> dict[str, Any]:
        rate = round(self.delivered / self.seconds, 1) if self.seconds > 0 else 0.0
        return {"delivered": self.delivered, "delivered_per_second": rate,
                **_ms(self.latencies, "e2e_"), "lost": self.lost, "duplicates": self.duplicates,
                "order_violations": self.order_violations}  # fmt: skip


def check_delivery(
    accepted: dict[int, list[str]],
    sent_at: dict[str, float],
    arrivals: Sequence[tuple[str, float]],
    start: float,
) -> Arrivals:
    """The arrivals (message id, time) checked against the ids accepted per key in order and
    when each was sent. Ids never accepted are left out: the ingress may publish a webhook it
    answered 503."""
    first: dict[str, float] = {}
    duplicates = 0
    for message_id, at in arrivals:
        if message_id in first:
            duplicates += 1
        elif message_id in sent_at:
            first[message_id] = at
    rank = {message_id: n for n, message_id in enumerate(first)}
    arrived = [[i for i in ids if i in rank] for ids in accepted.values()]
    return Arrivals(
        delivered=len(first),
        seconds=max(first.values(), default=start) - start,
        latencies=[at - sent_at[i] for i, at in first.items()],
        lost=len(sent_at) - len(first),
        duplicates=duplicates,
        order_violations=sum(ids != sorted(ids, key=rank.__getitem__) for ids in arrived),
    )


@dataclass(slots=True, kw_only=True)
class BenchReport:
    """What the target answered, filled in as the run goes; with `track`, the ids accepted per
    key in order and when each was sent, for `check_delivery`."""

    track: bool = False
    answers: Counter[str] = field(default_factory=Counter)  # "accepted", "HTTP 503", "failed"
    latencies: list[float] = field(default_factory=list)  # seconds, of the answered requests
    errors: list[str] = field(default_factory=list)  # the first few kinds
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this process while sending (--e2e: the worker's and sink's too)
    signed_late: int = 0  # webhooks signed during the run
    accepted: dict[int, list[str]] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    delivery: Arrivals | None = None

    def answered(self, answer: Reply, key: int, started: float, now: float) -> None:
        self.latencies.append(now - started)
        try:
            said = orjson.loads(answer.body) if answer.body else None
        except orjson.JSONDecodeError:
            said = None
        said = said if isinstance(said, dict) else {}
        status = said.get("status") if answer.status == 200 else None
        if not isinstance(status, str):
            self.answers[f"HTTP {answer.status}"] += 1
            detail = said.get("error") or answer.body[:100].decode("utf-8", "replace") or "-"
            self._error(f"HTTP {answer.status}: {detail}")
        else:
            self.answers[status] += 1
        if self.track and status == "accepted":
            self.accepted.setdefault(key, []).append(said["id"])
            self.sent_at[said["id"]] = started

    def failed(self, exc: Exception) -> None:
        self.answers["failed"] += 1
        self._error(f"failed: {type(exc).__name__}: {exc}")

    def _error(self, text: str) -> None:
        if len(self.errors) < ERRORS_KEPT and text not in self.errors:
            self.errors.append(text)

    @property
    def ok(self) -> bool:
        delivered = (
            self.delivery is None or self.delivery.lost == self.delivery.order_violations == 0
        )
        return 0 < self.answers["accepted"] == self.answers.total() and delivered

    def as_dict(self) -> dict[str, Any]:
        accepted, requests = self.answers["accepted"], self.answers.total()
        seconds = self.seconds or math.nan
        return {
            "requests": requests, "accepted": accepted, "seconds": round(self.seconds, 3),
            "accepted_per_second": round(accepted / seconds, 1), **_ms(self.latencies),
            "answers": dict(self.answers.most_common()), "errors": self.errors,
            "signed_during_run": self.signed_late,
            "cpu_us_per_request": round(1e6 * self.cpu_seconds / max(requests, 1), 1),
            "cpu_busy": round(self.cpu_seconds / seconds, 2),
            **(self.delivery.as_dict() if self.delivery else {}),
        }  # fmt: skip

    def render(self) -> str:
        d = self.as_dict()
        answers = ", ".join(f"{n:,} {what}" for what, n in d["answers"].items()) or "none"
        lines = [
            f"requests      {d['requests']:,} in {d['seconds']:.2f} s: {answers}",
            f"accepted/s    {d['accepted_per_second']:,.1f}",
            "latency ms    " + "  ".join(f"{p} {d[f'{p}_ms']:.2f}" for p in _POINTS),
        ]
        if self.delivery is not None:
            lines += [
                f"delivered     {d['delivered']:,} ({d['delivered_per_second']:,.1f}/s), lost "
                f"{d['lost']:,}, duplicates {d['duplicates']:,}, order violations "
                f"{d['order_violations']:,}",
                "end to end ms " + "  ".join(f"{p} {d[f'e2e_{p}_ms']:.2f}" for p in _POINTS),
            ]
        lines.append(f"bench CPU     {d['cpu_us_per_request']:.1f} us/request, "
                     f"{d['cpu_busy']:.0%} of a core")  # fmt: skip
        if self.signed_late:
            lines.append(f"              {self.signed_late:,} webhooks signed during the run "
                         "(--count or --rate signs them all ahead)")  # fmt: skip
        return "\n".join(lines)


_POINTS = ("p50", "p95", "p99", "max")


# --- end to end -------------------------------------------------------------------------------


class Sink:
    """An HTTP endpoint in this process that records the message id (the Standard Webhooks
    `webhook-id` header of relay's deliveries) and arrival time of each POST, and answers 200."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, float]] = []
        self.arrived = asyncio.Event()  # set at each arrival
        app = web.Application()
        app.router.add_post("/", self._receive)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> str:
        """Serve on a free loopback port; the URL."""
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}/"

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        self.arrivals.append((request.headers.get("webhook-id", ""), time.perf_counter()))
        self.arrived.set()
        await request.read()
        return web.Response()


@contextlib.asynccontextmanager
async def temporary_handler(
    settings: Settings, source: SourceSettings, url: str
) -> AsyncIterator[None]:
    """A handler `bench-<hex>` of the source's events POSTing to `url`: its topology declared
    and a Worker consuming it during the block; then stopped, its queues and exchange deleted."""
    pattern = f"{source.name}.#"
    handler = HandlerSettings(name=f"bench-{uuid.uuid4().hex[:8]}", events=(pattern,),
                              bindings=(pattern,), url=url, partitions=E2E_PARTITIONS)  # fmt: skip
    settings = replace(settings, handlers=(*settings.handlers, handler))
    connection = await connect(settings.broker)
    try:
        channel = await connection.channel()
        described = topology.ingress(settings) + topology.handler(settings, handler)
        await topology.declare(
            channel, await topology.without_existing_streams(connection, described)
        )
        worker = Worker(settings, [handler.name])
        running = asyncio.create_task(worker.async_run())
        ready = asyncio.create_task(worker.ready.wait())
        try:
            await asyncio.wait([ready, running], timeout=WORKER_SECONDS,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if not ready.done():
                if running.done():
                    running.result()  # its error
                raise RelayError(f"the worker of handler {handler.name} did not start consuming")
            yield
        finally:
            ready.cancel()
            worker.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(running, WORKER_SECONDS)
    finally:
        await _delete(connection, handler)
        await connection.close()


async def _delete(connection: AbstractConnection, handler: HandlerSettings) -> None:
    """The handler's queues and exchange: never the main exchange, nor the shared queues."""
    for name in [*handler.queues, handler.dead_letter_queue, handler.outcome_log, handler.exchange]:
        assert name.startswith(f"relay.{handler.name}")
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            channel = await connection.channel()  # a failed delete closes it
            delete = channel.exchange_delete if name == handler.exchange else channel.queue_delete
            await delete(name)
            await channel.close()


async def end_to_end(
    settings: Settings,
    source: SourceSettings,
    load: Load,
    target: Endpoint,
    signer: Signer,
    report: BenchReport,
    *,
    quiet: bool,
) -> None:
    sink = Sink()
    report.track = True
    try:
        async with temporary_handler(settings, source, await sink.start()):
            start = time.perf_counter()
            await bench(load, target, signer, report, quiet=quiet)
            arrived: set[str] = set()
            seen = 0  # of sink.arrivals

            def delivered() -> int:
                nonlocal seen
                arrived.update(i for i, _ in sink.arrivals[seen:] if i in report.sent_at)
                seen = len(sink.arrivals)
                return len(arrived)

            def line() -> str:
                return f"delivered {delivered():,} of {len(report.sent_at):,}"

            deadline = time.perf_counter() + DELIVERY_SECONDS
            async with progress(line, quiet=quiet):
                while delivered() < len(report.sent_at) and time.perf_counter() < deadline:
                    sink.arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(sink.arrived.wait(), deadline - time.perf_counter())
    finally:
        await sink.stop()
    report.delivery = check_delivery(report.accepted, report.sent_at, sink.arrivals, start)
