"""The HTTP ingress: verify, validate, publish with a confirm, then answer.

Built to be cheap to attack (docs/OPERATIONS.md, "Running it on the internet"): bodies are read raw
and never inflated, a declared or actual size over `max_body_bytes` is refused before or while
reading, a body that does not arrive within `body_timeout_seconds` is 408, idle connections and the
headers of new ones are bounded by `keepalive_seconds`, and at most `max_connections` are served at
once.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol, cast

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from relay import _aiohttp, metrics, tracing
from relay.accepted import AcceptedIds
from relay.errors import BrokerUnavailable, CannotListen, RequestError, Unroutable
from relay.providers import PROVIDERS, Event, Request
from relay.publisher import Publisher
from relay.seen import digest
from relay.settings import IngressSettings, Settings, SourceSettings

log = structlog.get_logger()

RETRY_AFTER_SECONDS = "5"
LINGER_SECONDS = 2.0  # after an early answer, how long the rest of a body may still be drained
CLIENT_GONE = "client_closed"  # the status label of requests whose client went away

# No version banner: every answer, aiohttp's own protocol errors included, names only relay.
_aiohttp.name_server("relay")


class EventPublisher(Protocol):
    """What the ingress needs of a publisher (relay.publisher.Publisher; a fake in tests)."""

    @property
    def ready(self) -> bool: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, event: Event) -> None: ...


SHED = "shed"  # what Acceptor.accept says of an event it did not publish: too many in flight
OVERLOADED = "overloaded: too many webhooks in flight"


class Acceptor:
    """Publishes each new event once; repeats of an id accepted by any ingress process within
    the horizon answer `duplicate` (relay/accepted.py).

    The publish runs in the request's own task: aiohttp does not cancel a handler whose client
    went away, so the publish completes and its id is remembered either way.

    At most `max_in_flight` publishes run at once: a new event beyond them is `shed` before its
    publish starts (so it is never half-published), while a repeat, or a copy of an id being
    published, costs no publish and is answered as before. Past capacity, waiting in line only
    makes every answer slow, and the provider's timeout then retries into the same line.
    """

    def __init__(
        self, publisher: EventPublisher, accepted: AcceptedIds, max_in_flight: int
    ) -> None:
        self.publisher = publisher
        self._publish = tracing.published(publisher.publish) if tracing.ON else publisher.publish
        self.accepted = accepted
        self.max_in_flight = max_in_flight
        self.shedding = False  # since the bound was reached, until half of it is free again
        # ids being published; a future once a concurrent request with the same id waits
        self._in_flight: dict[str, asyncio.Future[None] | None] = {}
        metrics.MAX_IN_FLIGHT.set(max_in_flight)

    async def accept(self, event: Event) -> str:
        message_id = event.message_id
        accepted = digest("", message_id)
        if self.accepted.seen(accepted):
            return "duplicate"
        if message_id in self._in_flight:  # the same id is being published by another request
            waiter = self._in_flight[message_id]
            if waiter is None:
                waiter = self._in_flight[message_id] = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # raises what the publish raised
            return "duplicate"
        if len(self._in_flight) >= self.max_in_flight:
            self._shed()
            return SHED
        self._in_flight[message_id] = None
        metrics.PUBLISHES_IN_FLIGHT.inc()
        try:
            started = time.perf_counter()
            await self._publish(event)
            metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
            self.accepted.add(accepted)
        except BaseException as exc:
            waiter = self._in_flight.pop(message_id)
            self._published()
            if waiter is not None:
                waiter.set_exception(
                    exc if isinstance(exc, Exception) else BrokerUnavailable("stopped")
                )
            raise
        waiter = self._in_flight.pop(message_id)
        self._published()
        if waiter is not None:
            waiter.set_result(None)
        return "accepted"

    def _shed(self) -> None:
        """Log the start of shedding once, not each shed request (thousands a second)."""
        if not self.shedding:
            self.shedding = True
            log.warning("shedding load: publishes in flight at max_in_flight, answering 503",
                        max_in_flight=self.max_in_flight)  # fmt: skip

    def _published(self) -> None:
        metrics.PUBLISHES_IN_FLIGHT.dec()
        if self.shedding and len(self._in_flight) <= self.max_in_flight // 2:
            self.shedding = False
            log.info("shedding stopped", max_in_flight=self.max_in_flight)


class AcceptQueue:
    """The connections waiting in the kernel's accept queue of the webhook port: where the line
    of a CPU-bound process forms. Past capacity, connections arrive faster than the process
    accepts them, so they wait there before relay reads a request: the loop's own work stays in
    short turns (its lag stays low), and publishes in flight never reach their bound
    (docs/PERFORMANCE.md, "Overload"). More than `max_waiting` there, the process is behind.

    Read with TCP_INFO from the listening socket (Linux: `tcpi_unacked` of a listening socket is
    its accept queue), a system call of about a microsecond per new connection or webhook; on
    other systems nothing is watched and the queue reads 0.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.behind_since: float | None = None  # logged when it starts and when it ends
        self._sockets: list[Any] = []  # listening sockets: socket.socket or uvloop's
        metrics.MAX_ACCEPT_QUEUE.set(max_waiting)

    def watch(self, sockets: Iterable[Any]) -> None:
        if sys.platform == "linux":  # elsewhere struct tcp_info differs, or is missing
            self._sockets = list(sockets)

    def waiting(self) -> int:
        """Connections waiting to be accepted, over the listening sockets."""
        total = 0
        for listening in self._sockets:
            try:
                info = listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
            except (OSError, ValueError):  # closed: the site stopped (a drain), nothing waits
                continue
            total += _UNACKED.unpack_from(info, _UNACKED_OFFSET)[0]
        return total

    def behind(self) -> bool:
        """Whether more than `max_waiting` connections wait; logs only when that changes."""
        waiting = self.waiting()
        metrics.ACCEPT_QUEUE.set(waiting)
        if waiting > self.max_waiting:
            if self.behind_since is None:
                self.behind_since = time.monotonic()
                log.warning("shedding load: connections waiting to be accepted, answering 503",
                            waiting=waiting, max_accept_queue=self.max_waiting)  # fmt: skip
            return True
        if self.behind_since is not None and waiting <= self.max_waiting // 2:
            log.info("shedding stopped: accept queue short again",
                     seconds=round(time.monotonic() - self.behind_since, 1))  # fmt: skip
            self.behind_since = None
        return False


# struct tcp_info: 8 one-byte fields, then rto, ato, snd_mss, rcv_mss, unacked (u32 each)
_UNACKED_OFFSET, _TCP_INFO_BYTES = 24, 32
_UNACKED = struct.Struct("=I")


class InFlight:
    """The webhook requests being handled, for the drain to wait for: aiohttp's own shutdown
    stops reading every connection first, so a body still arriving would never arrive."""

    def __init__(self) -> None:
        self.draining = False  # answers then close their connection
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self._count += 1
        self._idle.clear()

    def leave(self) -> None:
        self._count -= 1
        if not self._count:
            self._idle.set()

    async def finished(self) -> None:
        """Once no request is in flight."""
        await self._idle.wait()


SETTINGS = web.AppKey("settings", Settings)
SOURCE_NAMES = web.AppKey("source_names", dict[str, str])  # path -> source name
MESSAGE_ID = web.RequestKey("message_id", str)  # of a request refused after it was parsed
JSON_HEADERS = {"Content-Type": "application/json"}
ACCEPTOR = web.AppKey("acceptor", Acceptor)
PUBLISHER = web.AppKey("publisher", EventPublisher)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
ACCEPT_QUEUE = web.AppKey("accept_queue", AcceptQueue)
# whether webhooks are shed one by one on the accept queue: only without `admin_port` (else new
# connections are, before their request is read, and the connections let in are served)
SHEDS_REQUESTS = web.AppKey("sheds_requests", bool)


def create_app(settings: Settings, publisher: EventPublisher | None = None) -> web.Application:
    """The webhook app; with no `ingress.admin_port`, also /healthz, /readyz and /metrics.
    `publisher` replaces the broker publisher (tests)."""
    middlewares = [tracing_middleware, error_middleware] if tracing.ON else [error_middleware]
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app[PUBLISHER] = publisher or Publisher(settings)
    app[SOURCE_NAMES] = {source.path: source.name for source in settings.sources}
    app[IN_FLIGHT] = InFlight()
    app[ACCEPT_QUEUE] = AcceptQueue(settings.ingress.max_accept_queue)
    app[SHEDS_REQUESTS] = settings.ingress.admin_port is None
    app.cleanup_ctx.append(_broker)
    expect = _expect_handler(settings.ingress.max_body_bytes)
    for source in settings.sources:
        app.router.add_post(source.path, _receiver(source), expect_handler=expect)
    if settings.ingress.admin_port is None:
        _add_operational_routes(app, app)
    return app


def create_admin_app(app: web.Application) -> web.Application:
    """/healthz, /readyz and /metrics of the ingress `app`, for `ingress.admin_port`."""
    admin = web.Application(middlewares=[error_middleware])
    admin[SETTINGS] = app[SETTINGS]
    _add_operational_routes(admin, app)
    return admin


def not_ready(app: web.Application) -> str | None:
    """Why the ingress `app` is not ready to accept webhooks, if it is not."""
    if not app[PUBLISHER].ready:
        return "broker connection is not usable"
    if ACCEPTOR not in app or not app[ACCEPTOR].accepted.ready:
        return "reading the ids accepted before (relay.ids)"
    return None


def _add_operational_routes(app: web.Application, ingress: web.Application) -> None:
    async def readyz(request: web.Request) -> web.Response:
        problem = not_ready(ingress)
        if problem:
            return _error(503, problem, retry_after=True)
        return _json({"status": "ready"})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)


async def _broker(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    accepted = AcceptedIds(app[SETTINGS], follow=isinstance(publisher, Publisher))
    app[ACCEPTOR] = Acceptor(publisher, accepted, app[SETTINGS].ingress.max_in_flight)
    publisher.start()
    accepted.start()
    yield
    await accepted.stop()
    await publisher.stop()


def _receiver(source: SourceSettings) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of a source's path: the hot path, so everything per source is bound once."""
    parse = PROVIDERS[source.scheme].parse
    if tracing.ON:
        parse = tracing.verified(parse)
    accepted = metrics.REQUESTS.labels(source.name, "200")
    shed = metrics.REQUESTS.labels(source.name, metrics.SHED)

    async def receive(request: web.Request) -> web.Response:
        app = request.app
        if app[SHEDS_REQUESTS] and app[ACCEPT_QUEUE].behind():  # before the body is read
            shed.inc()
            return _closing(_error(503, OVERLOADED, retry_after=True))
        in_flight = app[IN_FLIGHT]
        in_flight.enter()
        try:
            body = await _read_body(request, app[SETTINGS].ingress)
            event = parse(Request(body, request.headers), source, time.time())
            try:
                status = await app[ACCEPTOR].accept(event)
            except (BrokerUnavailable, Unroutable):
                request[MESSAGE_ID] = event.message_id  # for the rejection's log line
                raise
        finally:
            in_flight.leave()
        if status == SHED:  # not logged one by one: Acceptor logs when shedding starts
            shed.inc()
            # closed: the client's next try opens a connection, refused cheaply while shedding
            return _closing(_error(503, OVERLOADED, retry_after=True))
        accepted.inc()
        answer = b'{"status":"' + status.encode() + b'","id":' + orjson.dumps(event.message_id)
        response = web.Response(body=answer + b"}", headers=JSON_HEADERS)
        if in_flight.draining or app[ACCEPT_QUEUE].behind():
            # while behind, a kept-alive connection would pass the connections waiting: its next
            # request waits in the accept queue like theirs (and is shed there if need be)
            response.force_close()
        return response

    return receive


class _Refused(RequestError):
    """A request refused before its body is read; the connection is closed after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_body(request: web.Request, limits: IngressSettings) -> bytes:
    """The raw body: never inflated, at most `max_body_bytes`, within `body_timeout_seconds`."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise _Refused(415, "Content-Encoding is not accepted: send the body uncompressed")
    length = request.content_length
    if length is not None and length > limits.max_body_bytes:
        raise _Refused(413, f"body larger than {limits.max_body_bytes} bytes")
    content = request.content
    if content.is_eof() and length is not None and content.total_bytes == length:
        return await content.read()  # it all arrived with the headers, the usual case
    try:
        async with asyncio.timeout(limits.body_timeout_seconds):
            body = bytearray()
            while chunk := await content.readany():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise _Refused(413, f"body larger than {limits.max_body_bytes} bytes")
    except TimeoutError:
        raise _Refused(
            408, f"body not received within {limits.body_timeout_seconds:g} seconds"
        ) from None
    return bytes(body)


def _expect_handler(limit: int) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """`Expect: 100-continue` gets 100 only for a body relay would read: else 413 or 417 now."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Expect", "").lower() != "100-continue":
            return _closing(_rejected(request, 417, "only Expect: 100-continue is understood"))
        if request.content_length is not None and request.content_length > limit:
            return _closing(_rejected(request, 413, f"body larger than {limit} bytes"))
        if request.version >= (1, 1):
            await _aiohttp.send_continue(request)
        return None

    return expect


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def tracing_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A span for each webhook request, around the answer error_middleware renders (only while
    tracing is on: relay/tracing.py)."""
    source = request.app[SOURCE_NAMES].get(request.path)
    if source is None:  # /healthz, /metrics, an unknown path: not a webhook
        return await handler(request)
    span = tracing.Request(request.method, request.path, request.headers, source)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        span.answered(status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Renders every error as a JSON answer; a client that went away is not an error."""
    try:
        return await handler(request)
    except _Refused as exc:
        return _closing(_rejected(request, exc.status, exc.message))
    except RequestError as exc:
        return _rejected(request, exc.status, exc.message)
    except (BrokerUnavailable, Unroutable) as exc:
        return _rejected(request, 503, str(exc), retry_after=True)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _rejected(request, exc.status, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionError:  # the client went away mid-request: no one reads this answer
        _count(request, CLIENT_GONE)
        log.info("client went away", method=request.method, path=request.path[:200])
        return _closing(web.Response(status=400))
    except Exception:
        log.exception("request failed")
        return _rejected(request, 500, "internal error")


def _count(request: web.Request, status: str) -> str | None:
    """Count an answer to a source's path; the source's name, if it is one."""
    source = request.app.get(SOURCE_NAMES, {}).get(request.path)
    if source is not None:
        metrics.REQUESTS.labels(source, status).inc()
    return source


def _rejected(
    request: web.Request, status: int, error: str, *, retry_after: bool = False
) -> web.Response:
    source = _count(request, str(status))
    about = {"source": source} if source else {}
    if MESSAGE_ID in request:
        about["message_id"] = request[MESSAGE_ID]
    log.warning("request rejected", status=status, error=error, method=request.method,
                path=request.path[:200], **about)  # fmt: skip
    return _error(status, error, retry_after=retry_after)


def _closing(response: web.Response) -> web.Response:
    response.force_close()
    return response


def _error(status: int, error: str, *, retry_after: bool = False) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if retry_after else None
    return _json({"error": error}, status=status, headers=headers)


def _json(
    payload: dict[str, str], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


# --- serving ----------------------------------------------------------------------------------


async def serve(settings: Settings, stopping: asyncio.Event, *, reuse_port: bool = False) -> None:
    """Serve the ingress until `stopping` is set, then drain: stop accepting connections, let
    requests in flight finish (up to `drain_seconds`), close the broker connection. With
    `reuse_port`, other processes may serve the same ports (relay/processes.py)."""
    ingress = settings.ingress
    app = create_app(settings)
    runner = web.AppRunner(app, **runner_options(ingress))
    admin = web.AppRunner(create_admin_app(app), access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        try:
            site = LimitedSite(
                runner, ingress.host, ingress.port, ingress.max_connections, reuse_port,
                shedding=sheds(app) if ingress.admin_port is not None else lambda: False,
            )  # fmt: skip
            await site.start()
            app[ACCEPT_QUEUE].watch(site.sockets)
            if ingress.admin_port is not None:
                await admin.setup()
                await web.TCPSite(
                    admin, ingress.admin_host, ingress.admin_port, reuse_port=reuse_port or None
                ).start()
        except OSError as exc:
            raise CannotListen(
                f"ingress on {ingress.host}:{ingress.port}: {exc.strerror}"
            ) from None
        log.info(
            "ingress listening",
            host=ingress.host,
            port=ingress.port,
            admin_port=ingress.admin_port,
            broker=settings.broker.safe_url,
            sources=[s.path for s in settings.sources],
        )
        _warn_of_development_secrets(settings)
        await stopping.wait()
        log.info("ingress draining")
        await _drain(app, runner, admin, ingress.drain_seconds)
    finally:
        await admin.cleanup()
        await runner.cleanup()  # closes every connection, then the broker's


async def _drain(
    app: web.Application, runner: web.AppRunner, admin: web.AppRunner, seconds: float
) -> None:
    """Stop listening (so /readyz is refused and a balancer moves on), then let the webhooks in
    flight finish, bodies still arriving included, for up to `seconds`."""
    for site in [*admin.sites, *runner.sites]:
        await site.stop()
    app[IN_FLIGHT].draining = True
    try:
        async with asyncio.timeout(seconds):
            await app[IN_FLIGHT].finished()
    except TimeoutError:
        log.warning("ingress drain timed out", seconds=seconds)


def sheds(app: web.Application) -> Callable[[], bool]:
    """Whether the ingress `app` sheds (its publishes in flight reached their bound, or too many
    connections wait to be accepted): then its site refuses new connections before reading
    them. Only with `admin_port` set: else /healthz, /readyz and /metrics share the webhook port,
    and refusing their connections would fail a liveness probe under load (webhooks are still
    shed, once their request's head is read)."""
    queue = app[ACCEPT_QUEUE]
    return lambda: (ACCEPTOR in app and app[ACCEPTOR].shedding) or queue.behind()


def runner_options(ingress: IngressSettings) -> dict[str, Any]:
    """How the HTTP server runs: raw bodies, bounded idle time, a drain on shutdown."""
    return {
        "access_log": None,
        "shutdown_timeout": ingress.drain_seconds,
        "auto_decompress": False,
        "keepalive_timeout": ingress.keepalive_seconds,
        "lingering_time": LINGER_SECONDS,
    }


def _warn_of_development_secrets(settings: Settings) -> None:
    for source in settings.sources:
        for secret in source.secrets:
            if secret.development:
                log.warning(
                    "DEVELOPMENT SECRET IN USE: anyone who read the config can sign webhooks",
                    source=source.name,
                    secret=repr(secret),
                )


class LimitedSite(web.TCPSite):
    """A TCP site that serves at most `max_connections` connections at once; a connection over
    the limit is answered 503 and closed at once. So is a new connection while `shedding()`:
    refused before any HTTP is parsed, a shed request costs a fraction of one read and
    answered (docs/PERFORMANCE.md, "Overload")."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        max_connections: int,
        reuse_port: bool = False,
        shedding: Callable[[], bool] = lambda: False,
    ):
        super().__init__(runner, host, port, reuse_port=reuse_port or None)
        self._max_connections = max_connections
        self._shedding = shedding
        self.sockets: list[Any] = []  # listening, once started

    async def start(self) -> None:
        # the kernel's accept queue as deep as the connections served: past capacity, a connection
        # waits there to be answered (cheaply, while shedding) rather than have its SYN dropped
        # and retried 1, 3, 7 s later (docs/PERFORMANCE.md, "Overload")
        self.sockets = await _aiohttp.start_site(
            self, self._connections, backlog=self._max_connections
        )

    def _connections(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        limit, shedding = self._max_connections, self._shedding

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) >= limit:
                return _Overloaded()
            if shedding():
                return _Shed()
            return server()

        return protocol


def _refusal(error: str, retry_after: str) -> bytes:
    """A whole HTTP 503 answer, written before any of the request is read."""
    body = orjson.dumps({"error": error})
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nServer: relay\r\nConnection: close\r\n"
        b"Retry-After: " + retry_after.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class _Overloaded(asyncio.Protocol):
    """A connection over `max_connections`: 503 and closed at once, logged."""

    ANSWER = _refusal("too many connections", "1")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        log.warning("connection refused: too many connections")
        cast(asyncio.WriteTransport, transport).write(self.ANSWER)
        transport.close()


class _Shed(asyncio.Protocol):
    """A new connection while the ingress sheds: 503 before its request is read, counted as shed
    with no source (a source is known by its path, which is never read); logged only when
    shedding starts (Acceptor, AcceptQueue)."""

    ANSWER = _refusal(OVERLOADED, RETRY_AFTER_SECONDS)
    counted = metrics.REQUESTS.labels("", metrics.SHED)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.counted.inc()
        cast(asyncio.WriteTransport, transport).write(self.ANSWER)
        transport.close()
