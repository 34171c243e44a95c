"""The console's aiohttp app: one middleware guards every request (who is asking, what they may
do, cross-site forms, security headers), the login, and the pages (relay/console/pages.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

import structlog
from aiohttp import web

from relay.console import pages
from relay.console.sessions import COOKIE, Session, Sessions, cross_site, same
from relay.errors import CannotListen
from relay.settings import Settings

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    # No inline script or style anywhere: a body that slipped through escaping still runs nothing
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # A journey's URL names a webhook: not for other sites. (Not no-referrer: a browser then
    # sends `Origin: null` with the console's own forms, which the guard refuses.)
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
OPEN_PATHS = ("/login", "/static/")  # reachable without a login

log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(settings: Settings, read_status: pages.ReadStatus | None = None) -> web.Application:
    """The console for `settings`; `read_status` stands in for `relay status`'s read (the
    benchmark's stub), else it is that."""
    app = web.Application(middlewares=[_guard])
    app[pages.SETTINGS] = settings
    app[pages.SESSIONS] = Sessions(settings.console)
    app[pages.OVERVIEW] = pages.Overview(settings, read_status)
    app.on_cleanup.append(lambda app: app[pages.OVERVIEW].close())
    app.router.add_get("/login", _login_form)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    pages.add_routes(app.router)
    app.router.add_static("/static/", STATIC)
    return app


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:  # a redirect, a 404
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reading needs a login unless console.public_read; a POST needs its form to come from the
    console's own page (and, but for the login, the session's CSRF token), and all but the
    login and the logout an operator."""
    sessions = request.app[pages.SESSIONS]
    session = sessions.get(request.cookies.get(COOKIE))
    request[pages.SESSION] = session
    path = request.path
    if request.method == "POST":
        own = f"{request.scheme}://{request.host}"
        if cross_site(request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site"), own):
            return _refused(request, 403, "Refused: this form was sent from another site.")
        if path == "/login":
            return await handler(request)
        form = await request.post()
        if session is None:
            return _refused(request, 403, "Refused: log in as an operator to do this.")
        csrf = form.get("csrf")
        if not isinstance(csrf, str) or not same(csrf, session.csrf):
            return _refused(request, 403, "Refused: the form is stale; reload the page.")
        if path != "/logout" and not session.may_act:
            return _refused(request, 403, "Refused: readers may look; log in as an operator.")
        return await handler(request)
    public = request.app[pages.SETTINGS].console.public_read
    if session is None and not public and not path.startswith(OPEN_PATHS):
        if path.startswith(pages.FRAGMENTS):
            return web.Response(status=401, text="log in again")
        raise web.HTTPSeeOther(f"/login?next={quote(_local(request.path_qs), safe='/')}")
    return await handler(request)


def _refused(request: web.Request, status: int, why: str) -> web.Response:
    session: Session | None = request[pages.SESSION]
    log.warning("console request refused", path=request.path, why=why,
                who=session.who if session else None, remote=request.remote)  # fmt: skip
    return pages.html(request, "refused.html", code=status, title="Refused", why=why)


def _local(target: str) -> str:
    """Only a path of this site to go to after the login (never `//other.example`)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


async def _login_form(request: web.Request) -> web.Response:
    return pages.html(
        request, "login.html", title="Log in", next=_local(request.query.get("next", "/"))
    )


async def _login(request: web.Request) -> web.Response:
    form = await request.post()
    token, who = str(form.get("token", "")), str(form.get("who", "")).strip()[:80]
    target = _local(str(form.get("next", "/")))
    opened = request.app[pages.SESSIONS].login(token, who or "someone")
    if opened is None:
        log.warning("console login refused", who=who, remote=request.remote)
        await asyncio.sleep(1)  # a guess a second at most, per connection
        return pages.html(request, "login.html", code=403, title="Log in", next=target,
                          failed=True)  # fmt: skip
    key, session = opened
    log.info("console login", who=session.who, role=session.role, remote=request.remote)
    response = _see_other(target)
    response.set_cookie(COOKIE, key, httponly=True, samesite="Strict", secure=request.secure,
                        path="/")  # fmt: skip
    return response


async def _logout(request: web.Request) -> web.Response:
    session = pages.acting(request)
    request.app[pages.SESSIONS].logout(request.cookies.get(COOKIE))
    log.info("console logout", who=session.who, role=session.role, remote=request.remote)
    response = _see_other("/login")
    response.del_cookie(COOKIE, path="/")
    return response


def _see_other(location: str) -> web.Response:
    """A redirect that carries a cookie (an HTTPException is raised, not returned)."""
    return web.Response(status=303, headers={"Location": location})


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    """Serve the console on console.host:port until `stopping` is set."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    host, port = settings.console.host, settings.console.port
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        why = os.strerror(exc.errno) if exc.errno else str(exc)  # not asyncio's long sentence
        raise CannotListen(f"console on {host}:{port}: {why}") from None
    log.info("console serving", url=f"http://{host}:{port}/")
    for name in ("token", "read_token"):
        secret = getattr(settings.console, name)
        if secret is not None and secret.development:
            log.warning("DEVELOPMENT TOKEN IN USE: anyone who read the config can log in",
                        token=name, secret=repr(secret))  # fmt: skip
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()
