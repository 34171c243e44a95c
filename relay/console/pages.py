"""The console's pages, each over an operator tool of relay/ops: the overview over `relay
status`, dead letters over `relay dlq`, the journey over `relay trace`, the replay form over
`relay replay`. Every action is logged with who did it and what it did."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from relay.console.render import QueueLinks, page, readable
from relay.console.sessions import Session, Sessions
from relay.errors import ConfigError, NotFound, RelayError
from relay.ops import deadletters, replay, status, trace
from relay.ops.status import Status
from relay.replays import Replay
from relay.settings import HandlerSettings, Settings

DEAD_LETTERS_SHOWN = 200  # a page lists at most this many (the first, in queue order)
FRAGMENTS = "/fragments/"  # what the page's script fetches: answered 401, never redirected

ReadStatus = Callable[..., Awaitable[Status]]
SETTINGS = web.AppKey("settings", Settings)
SESSIONS = web.AppKey("sessions", Sessions)
SESSION: web.RequestKey[Session | None] = web.RequestKey("session")  # None: no login


class Overview:
    """`relay status`'s figures (relay.unrouted not read: that read holds its head a moment),
    read at most once per half refresh interval however many pages poll. A page gets the
    newest reading at once, a stale one starting the next read meanwhile: it waits on the
    broker only for the first read, and after a read failed (to say why)."""

    def __init__(self, settings: Settings, read: ReadStatus | None = None) -> None:
        self._settings = settings
        self._read = read or status.status
        self._fresh = settings.console.refresh_seconds / 2
        self._read_at = -float("inf")
        self._status: Status | None = None
        self._failed: RelayError | None = None
        self._reading: asyncio.Task[None] | None = None
        self.read_at = ""  # when the reading `get` returns was taken (ISO 8601, UTC)

    async def get(self) -> Status:
        stale = time.monotonic() - self._read_at >= self._fresh
        if self._reading is None or (self._reading.done() and stale):
            self._reading = asyncio.create_task(self._read_now())
        if self._status is None or self._failed is not None:
            await asyncio.shield(self._reading)
        if self._failed is not None:
            raise self._failed
        assert self._status is not None
        return self._status

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)

    async def _read_now(self) -> None:
        try:
            self._status = await self._read(self._settings, read_unrouted=False)
        except RelayError as exc:
            self._failed = exc
        else:
            self._failed, self._read_at = None, time.monotonic()
            self.read_at = datetime.now(UTC).isoformat()


OVERVIEW = web.AppKey("overview", Overview)
log = structlog.get_logger()


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", _overview)
    router.add_get(FRAGMENTS + "overview", _overview_table)
    router.add_get("/handlers/{handler}/dead-letters", _dead_letters)
    router.add_post("/handlers/{handler}/dead-letters/confirm", _confirm)
    router.add_post("/handlers/{handler}/dead-letters/{action:replay|purge}", _act)
    router.add_get("/journey", _journey)
    router.add_get("/handlers/{handler}/replay", _replay_form)
    router.add_post("/handlers/{handler}/replay/count", _replay_count)
    router.add_post("/handlers/{handler}/replay", _replay)


def html(request: web.Request, template: str, *, code: int = 200, **context: Any) -> web.Response:
    """A page: the template with what every page shows (who is logged in, a notice)."""
    session: Session | None = request[SESSION]
    settings = request.app[SETTINGS]
    text = page(
        template,
        session=session,
        notice=session.take_notice() if session else "",
        may_act=session is not None and session.may_act,
        queue_url=QueueLinks(settings),
        **context,
    )
    return web.Response(text=text, status=code, content_type="text/html")


def acting(request: web.Request) -> Session:
    """The session of a POST: the guard lets none through without one."""
    session = request[SESSION]
    assert session is not None, "a POST past the guard has a session"
    return session


def _handler(request: web.Request) -> HandlerSettings:
    try:
        return request.app[SETTINGS].handler(request.match_info["handler"])
    except ConfigError:
        raise web.HTTPNotFound(text="no such handler") from None


def _acted(request: web.Request, what: str, **fields: Any) -> None:
    """Log an action with who did it and from where."""
    session = acting(request)
    log.info("console action", action=what, who=session.who, role=session.role,
             remote=request.remote, **fields)  # fmt: skip


# --- overview ---------------------------------------------------------------------------------


async def _overview_context(request: web.Request) -> tuple[int, dict[str, Any]]:
    overview = request.app[OVERVIEW]
    try:
        found = await overview.get()
    except RelayError as exc:
        return 503, {"status": None, "error": str(exc)}
    return 200, {"status": found, "error": "", "read_at": overview.read_at}


async def _overview(request: web.Request) -> web.Response:
    code, context = await _overview_context(request)
    refresh = request.app[SETTINGS].console.refresh_seconds
    return html(request, "overview.html", code=code, title="Overview", refresh=refresh,
                **context)  # fmt: skip


async def _overview_table(request: web.Request) -> web.Response:
    code, context = await _overview_context(request)
    return html(request, "overview_table.html", code=code, **context)


# --- dead letters -----------------------------------------------------------------------------


async def _dead_letters(request: web.Request) -> web.Response:
    handler = _handler(request)
    try:
        read = await deadletters.read_dead_letters(
            request.app[SETTINGS], handler, DEAD_LETTERS_SHOWN
        )
    except RelayError as exc:
        return html(request, "dead_letters.html", code=503, title="Dead letters",
                    handler=handler, letters=[], error=str(exc), now=datetime.now(UTC))  # fmt: skip
    letters = [(letter, readable(body)) for letter, body in read]
    return html(request, "dead_letters.html", title=f"Dead letters of {handler.name}",
                handler=handler, letters=letters, error="", shown=DEAD_LETTERS_SHOWN,
                now=datetime.now(UTC))  # fmt: skip


async def _confirm(request: web.Request) -> web.Response:
    handler = _handler(request)
    form = await request.post()
    action = form.get("action")
    ids = [str(i) for i in form.getall("id", [])]
    if action not in ("replay", "purge") or not ids:
        raise web.HTTPBadRequest(text="choose replay or purge, and at least one dead letter")
    return html(request, "confirm.html", title="Confirm", handler=handler, action=action,
                ids=ids)  # fmt: skip


async def _act(request: web.Request) -> web.Response:
    handler = _handler(request)
    action = request.match_info["action"]
    ids = [str(i) for i in (await request.post()).getall("id", [])]
    if not ids:
        raise web.HTTPBadRequest(text="no dead letter chosen")
    act = deadletters.replay if action == "replay" else deadletters.purge
    session = acting(request)
    try:
        count = await act(request.app[SETTINGS], handler, ids)
    except RelayError as exc:
        _acted(request, f"dlq {action} failed", handler=handler.name, ids=ids, error=str(exc))
        session.notice = f"Nothing done: {exc}"
    else:
        _acted(request, f"dlq {action}", handler=handler.name, ids=ids, count=count)
        done = "replayed to its partitions" if action == "replay" else "purged"
        session.notice = f"{count} dead letter(s) of {handler.name} {done}."
    raise web.HTTPSeeOther(f"/handlers/{handler.name}/dead-letters")


# --- journey ----------------------------------------------------------------------------------


async def _journey(request: web.Request) -> web.Response:
    asked = request.query.get("q", "").strip()
    by = "key" if request.query.get("by") == "key" else "id"
    since_text = request.query.get("since", trace.SINCE).strip() or trace.SINCE
    context: dict[str, Any] = {"q": asked, "by": by, "since": since_text, "journeys": [],
                               "error": ""}  # fmt: skip
    if not asked:
        return html(request, "journey.html", title="Journey", **context)
    settings = request.app[SETTINGS]
    try:
        since = replay.parse_time(since_text, datetime.now(UTC))
        if by == "id":
            journeys = [await trace.trace_id(settings, asked, since)]
        else:
            journeys = await trace.trace_key(settings, asked, since, trace.LAST)
    except NotFound as exc:
        return html(request, "journey.html", code=404, title="Journey",
                    **{**context, "error": str(exc)})  # fmt: skip
    except RelayError as exc:
        return html(request, "journey.html", code=503 if not isinstance(exc, ConfigError)
                    else 400, title="Journey", **{**context, "error": str(exc)})  # fmt: skip
    return html(request, "journey.html", title=f"Journey of {asked}",
                **{**context, "journeys": [j.as_dict() for j in journeys]})  # fmt: skip


# --- archive replay ---------------------------------------------------------------------------


def _wanted(handler: HandlerSettings, since_text: str, key: str) -> Replay:
    """OptionError (a RelayError) if `since_text` is no time."""
    since = replay.parse_time(since_text, datetime.now(UTC))
    return Replay.new(handler.name, since, keys=(key,) if key else ())


async def _replay_form(request: web.Request) -> web.Response:
    handler = _handler(request)
    return html(request, "replay.html", title=f"Replay {handler.name}", handler=handler,
                since=request.query.get("since", ""), key=request.query.get("key", ""),
                counted=None, error="")  # fmt: skip


async def _replay_count(request: web.Request) -> web.Response:
    """The dry run: what a replay would send, per event; the form to confirm it."""
    handler = _handler(request)
    form = await request.post()
    since, key = str(form.get("since", "")).strip(), str(form.get("key", "")).strip()
    context: dict[str, Any] = {"handler": handler, "since": since, "key": key, "counted": None,
                               "error": ""}  # fmt: skip
    try:
        wanted = _wanted(handler, since, key)
        done = await replay.replay(request.app[SETTINGS], handler, wanted, dry_run=True)
    except RelayError as exc:
        return html(request, "replay.html", code=400, title=f"Replay {handler.name}",
                    **{**context, "error": str(exc)})  # fmt: skip
    counted = sorted(done.queued.items())
    return html(request, "replay.html", title=f"Replay {handler.name}",
                **{**context, "counted": counted, "total": done.queued.total()})  # fmt: skip


async def _replay(request: web.Request) -> web.Response:
    handler = _handler(request)
    form = await request.post()
    since, key = str(form.get("since", "")).strip(), str(form.get("key", "")).strip()
    session = acting(request)
    try:
        wanted = _wanted(handler, since, key)
        done = await replay.replay(request.app[SETTINGS], handler, wanted, dry_run=False)
    except RelayError as exc:
        _acted(request, "replay failed", handler=handler.name, since=since, key=key,
               error=str(exc))  # fmt: skip
        session.notice = f"Nothing replayed: {exc}"
        raise web.HTTPSeeOther(f"/handlers/{handler.name}/replay") from None
    total = done.queued.total()
    _acted(request, "replay", handler=handler.name, since=since, key=key, replay=done.replay,
           count=total)  # fmt: skip
    session.notice = f"Replay {done.replay}: {total} webhook(s) queued for {handler.name}."
    raise web.HTTPSeeOther("/")
