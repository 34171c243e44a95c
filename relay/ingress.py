"""The HTTP ingress: verify, validate, publish with a confirm, then answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import metrics
from relay.errors import BrokerUnavailable, RequestError, Unroutable
from relay.provider import PROVIDERS, Event
from relay.publisher import Publisher
from relay.settings import Settings, SourceSettings

log = structlog.get_logger()

RETRY_AFTER_SECONDS = "5"


class DuplicateWindow:
    """The last `size` accepted message ids of this process, oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._ids

    def add(self, message_id: str) -> None:
        if self._size == 0:
            return
        self._ids[message_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)


class Acceptor:
    """Publishes each new event once; repeats of an accepted id answer `duplicate`."""

    def __init__(self, publisher: Publisher, window: DuplicateWindow) -> None:
        self.publisher = publisher
        self._window = window
        self._in_flight: dict[str, asyncio.Task[None]] = {}

    async def accept(self, event: Event) -> str:
        message_id = event.message_id
        if message_id in self._window:
            return "duplicate"
        publishing = self._in_flight.get(message_id)
        if publishing is not None:  # the same id is being published by another request
            await asyncio.shield(publishing)
            return "duplicate"
        publishing = asyncio.ensure_future(self._publish(event))
        self._in_flight[message_id] = publishing
        publishing.add_done_callback(lambda _: self._in_flight.pop(message_id, None))
        await asyncio.shield(publishing)  # a client that goes away does not cancel a publish
        return "accepted"

    async def _publish(self, event: Event) -> None:
        started = time.perf_counter()
        await self.publisher.publish(event)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
        self._window.add(event.message_id)


SETTINGS = web.AppKey("settings", Settings)
ACCEPTOR = web.AppKey("acceptor", Acceptor)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.ingress.max_body_bytes
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_broker)
    for source in settings.sources:
        app.router.add_post(source.path, _receiver(source))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


async def _broker(app: web.Application) -> AsyncIterator[None]:
    publisher = Publisher(app[SETTINGS])
    app[ACCEPTOR] = Acceptor(publisher, DuplicateWindow(app[SETTINGS].ingress.duplicate_window))
    publisher.start()
    yield
    await publisher.stop()


def _receiver(source: SourceSettings) -> Callable[[web.Request], Awaitable[web.Response]]:
    provider = PROVIDERS[source.scheme]

    async def receive(request: web.Request) -> web.Response:
        structlog.contextvars.bind_contextvars(source=source.name)
        body = await request.read()
        event = provider.parse(body, source, time.time())
        structlog.contextvars.bind_contextvars(message_id=event.message_id)
        status = await request.app[ACCEPTOR].accept(event)
        metrics.REQUESTS.labels(source.name, "200").inc()
        return _json({"status": status, "id": event.message_id})

    return receive


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[ACCEPTOR].publisher.ready:
        return _json({"status": "ready"})
    return _error(503, "broker connection is not usable", retry_after=True)


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Binds a request id into the log context; renders every error as a JSON answer."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=uuid.uuid4().hex[:16])
    try:
        return await handler(request)
    except RequestError as exc:
        return _rejected(request, exc.status, exc.message)
    except (BrokerUnavailable, Unroutable) as exc:
        return _rejected(request, 503, str(exc), retry_after=True)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason
        if exc.status == 413:
            reason = f"body larger than {request.app[SETTINGS].ingress.max_body_bytes} bytes"
        response = _rejected(request, exc.status, reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("request failed")
        return _rejected(request, 500, "internal error")


def _rejected(
    request: web.Request, status: int, error: str, *, retry_after: bool = False
) -> web.Response:
    source = structlog.contextvars.get_contextvars().get("source")
    if source is not None:
        metrics.REQUESTS.labels(source, str(status)).inc()
    log.warning("request rejected", status=status, error=error, method=request.method,
                path=request.path)  # fmt: skip
    return _error(status, error, retry_after=retry_after)


def _error(status: int, error: str, *, retry_after: bool = False) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if retry_after else None
    return _json({"error": error}, status=status, headers=headers)


def _json(
    payload: dict[str, str], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )
