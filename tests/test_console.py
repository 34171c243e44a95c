"""`relay console` over HTTP, without a broker: the overview reads a stand-in for `relay
status`; logins, CSRF, cross-site forms, escaping and the security headers are the console's
own. The browser tests (tests/test_console_browser.py) run it against a real relay."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession, CookieJar
from aiohttp.test_utils import TestServer
from yarl import URL

from relay.console.app import create_app
from relay.console.pages import Overview
from relay.console.render import BODY_CHARS, page, readable
from relay.console.sessions import COOKIE, cross_site
from relay.errors import BrokerUnavailable
from relay.ops.status import HandlerStatus, PartitionStatus, Status
from relay.secrets import Secret
from relay.settings import ConsoleSettings, HandlerSettings, Settings
from tests.support import eventually

OPERATOR, READER = "operator-token", "reader-token"
SCRIPT = "<script>window.pwned = 1</script>"


def a_status(detail: str = "HTTP 503") -> Status:
    since = "2026-12-07T14:02:00+00:00"
    parked = PartitionStatus(queue="relay.billing.0", ready=3, unacked=1, consumers=2,
                             state="parked", detail=detail, since=since)  # fmt: skip
    live = PartitionStatus(queue="relay.billing.1", ready=0, unacked=0, consumers=1, state="live")
    return Status([HandlerStatus("billing", [parked, live], dead_letters=2)], unrouted=5)


def settings(**console: Any) -> Settings:
    return Settings(
        console=replace(
            ConsoleSettings(token=Secret(OPERATOR), read_token=Secret(READER)), **console
        ),
        handlers=(HandlerSettings(name="billing", events=("envoice.#",)),),
    )


class Console:
    """The console app on a loopback port, reading `status` for the overview."""

    def __init__(self, client: ClientSession, origin: str) -> None:
        self.client, self.origin = client, origin
        self.csrf = ""

    async def login(self, token: str = OPERATOR) -> ClientResponse:
        answer = await self.client.post(
            "/login", data={"token": token, "who": "ann", "next": "/"}, allow_redirects=False
        )
        if answer.status == 303:
            home = await (await self.client.get("/")).text()
            found = re.search(r'name="csrf" value="([^"]+)"', home)
            assert found is not None
            self.csrf = found[1]
        return answer

    async def post(self, path: str, **form: str) -> ClientResponse:
        headers = {"Origin": self.origin, "Sec-Fetch-Site": "same-origin"}
        return await self.client.post(path, data=form, headers=headers, allow_redirects=False)


@pytest.fixture
async def console(request: pytest.FixtureRequest) -> AsyncIterator[Console]:
    options = getattr(request, "param", {})
    detail = options.pop("detail", "HTTP 503")

    async def read(_: Settings, **__: Any) -> Status:
        return a_status(detail)

    server = TestServer(create_app(settings(**options), read), host="127.0.0.1")
    await server.start_server()
    origin = str(server.make_url("")).rstrip("/")
    try:
        async with ClientSession(base_url=origin, cookie_jar=CookieJar(unsafe=True)) as client:
            yield Console(client, origin)
    finally:
        await server.close()


async def test_without_a_login_a_page_sends_to_the_login_and_the_fragment_is_refused(
    console: Console,
) -> None:
    page_answer = await console.client.get("/journey?q=x", allow_redirects=False)
    fragment = await console.client.get("/fragments/overview", allow_redirects=False)

    assert page_answer.status == 303
    location = URL(page_answer.headers["Location"])
    assert (location.path, location.query["next"]) == ("/login", "/journey?q=x")
    assert fragment.status == 401


@pytest.mark.parametrize("console", [{"public_read": True}], indirect=True)
async def test_public_read_shows_the_overview_without_a_login(console: Console) -> None:
    answer = await console.client.get("/")

    text = await answer.text()
    assert answer.status == 200
    assert '<span class="state state-parked">parked</span>' in text
    assert '<time datetime="2026-12-07T14:02:00+00:00"' in text
    assert "http://localhost:15672/#/queues/%2F/relay.billing.0" in text
    assert "Log in as an operator" not in text  # the overview has no actions


async def test_a_login_opens_a_session_in_a_cookie_scripts_and_other_sites_cannot_use(
    console: Console,
) -> None:
    answer = await console.login()

    assert answer.status == 303
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/" in cookie


async def test_a_wrong_token_opens_nothing(console: Console) -> None:
    answer = await console.login("guess")

    assert answer.status == 403
    assert "Set-Cookie" not in answer.headers
    assert "That token opens nothing." in await answer.text()


async def test_an_action_without_a_login_is_refused(console: Console) -> None:
    answer = await console.post("/handlers/billing/dead-letters/replay", id="envoice:1")

    assert answer.status == 403
    assert "log in as an operator" in await answer.text()


async def test_an_action_without_the_session_s_csrf_token_is_refused(console: Console) -> None:
    await console.login()

    missing = await console.post("/handlers/billing/dead-letters/replay", id="envoice:1")
    wrong = await console.post(
        "/handlers/billing/dead-letters/replay", id="envoice:1", csrf="x" * 43
    )

    for answer in (missing, wrong):
        assert answer.status == 403
        assert "the form is stale" in await answer.text()


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
async def test_a_form_from_another_site_is_refused_even_with_the_csrf_token(
    console: Console, headers: dict[str, str]
) -> None:
    await console.login()

    answer = await console.client.post(
        "/handlers/no-such-handler/dead-letters/replay",
        data={"id": "envoice:1", "csrf": console.csrf},
        headers=headers,
        allow_redirects=False,
    )

    assert answer.status == 403
    assert "sent from another site" in await answer.text()


async def test_an_operator_s_form_with_its_token_gets_through(console: Console) -> None:
    await console.login()

    # a handler the config lacks: past the guard, the page answers, and nothing is touched
    answer = await console.post(
        "/handlers/no-such-handler/dead-letters/replay", id="envoice:1", csrf=console.csrf
    )

    assert answer.status == 404


async def test_a_reader_may_look_but_not_act(console: Console) -> None:
    await console.login(READER)

    looked = await console.client.get("/")
    acted = await console.post(
        "/handlers/billing/dead-letters/confirm", id="envoice:1", action="purge",
        csrf=console.csrf,
    )  # fmt: skip

    assert looked.status == 200
    assert acted.status == 403
    assert "readers may look" in await acted.text()


async def test_a_logout_ends_the_session(console: Console) -> None:
    await console.login()

    out = await console.post("/logout", csrf=console.csrf)
    after = await console.client.get("/", allow_redirects=False)

    assert out.status == 303
    assert after.status == 303


async def test_after_the_login_only_a_path_of_this_site_is_followed(console: Console) -> None:
    answer = await console.client.post(
        "/login", data={"token": OPERATOR, "next": "//evil.example/"}, allow_redirects=False
    )

    assert answer.headers["Location"] == "/"


@pytest.mark.parametrize("console", [{"public_read": True, "detail": SCRIPT}], indirect=True)
async def test_what_relay_read_is_escaped(console: Console) -> None:
    text = await (await console.client.get("/fragments/overview")).text()

    assert SCRIPT not in text
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in text


@pytest.mark.parametrize("path", ["/", "/login", "/static/console.css", "/nowhere"])
async def test_every_answer_carries_the_security_headers(console: Console, path: str) -> None:
    answer = await console.client.get(path, allow_redirects=False)

    csp = answer.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_the_templates_carry_no_inline_script_or_style() -> None:
    rendered = page("login.html", session=None, notice="", may_act=False, title="t", next="/",
                    queue_url=str)  # fmt: skip

    assert "<script>" not in rendered
    assert "style=" not in rendered
    assert 'src="/static/console.js"' in rendered


def test_a_body_is_indented_json_and_bounded() -> None:
    assert readable(b'{"a":{"b":1}}') == '{\n  "a": {\n    "b": 1\n  }\n}'
    assert readable(b"\xff<not json>") == "\ufffd<not json>"
    long = readable(b"x" * (BODY_CHARS + 10))
    assert long.endswith("… 10 more characters not shown")
    assert len(long) < BODY_CHARS + 40


def test_a_request_another_origin_started_is_cross_site() -> None:
    own = "http://127.0.0.1:8090"

    assert cross_site("http://127.0.0.1:9999", None, own)  # same site, another origin
    assert cross_site(None, "same-site", own)
    assert not cross_site(own, "same-origin", own)
    assert not cross_site(None, None, own)  # no browser: no page could have driven it


async def test_a_broker_that_cannot_be_read_is_said_on_the_page() -> None:
    app_settings = settings(public_read=True)

    async def unreachable(_: Settings, **__: Any) -> Status:
        raise BrokerUnavailable("management API unreachable at http://127.0.0.1:15672/")

    server = TestServer(create_app(app_settings, unreachable), host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession(base_url=str(server.make_url(""))) as client:
            answer = await client.get("/fragments/overview")
            text = await answer.text()
    finally:
        await server.close()

    assert answer.status == 503
    assert "Cannot read relay's state: management API unreachable" in text


async def test_the_overview_shows_the_last_reading_while_the_next_is_read() -> None:
    readings = [a_status("first"), a_status("second")]
    go_on = asyncio.Event()

    async def read(_: Settings, **__: Any) -> Status:
        if len(readings) == 1:  # the second read waits for the test
            await go_on.wait()
        return readings.pop(0)

    overview = Overview(settings(refresh_seconds=0.5), read)
    first = await overview.get()  # the first read is waited for
    await asyncio.sleep(0.3)  # stale: half the refresh has gone by

    meanwhile = await asyncio.wait_for(overview.get(), 1)  # not waiting on the read it started
    go_on.set()
    after = await eventually(lambda: _detail(overview), what="the second reading")
    await overview.close()

    assert (_first_detail(first), _first_detail(meanwhile)) == ("first", "first")
    assert after == "second"


def _first_detail(found: Status) -> str:
    return found.handlers[0].partitions[0].detail


async def _detail(overview: Overview) -> str | None:
    found = _first_detail(await overview.get())
    return found if found == "second" else None
