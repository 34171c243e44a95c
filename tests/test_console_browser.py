"""`relay console` in a real browser: Debian's headless Chromium (deploy/test.sh installs it),
driven by Playwright, against a real relay (the ingress and a worker in this process), the real
broker and a loopback handler. Each test has a vhost of its own, so that the archive a journey
reads is the test's.

With RELAY_WRITE_SCREENSHOTS=1 the tests write docs/console-*.png (the README shows them);
otherwise they leave the tree alone."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, async_playwright, expect

from relay.config import from_dict as config_from_dict
from relay.console.app import create_app
from relay.ops import deadletters
from relay.settings import HandlerSettings, Settings
from tests.conftest import settings_dict
from tests.handlers_for_tests import HttpHandler
from tests.support import (
    ROOT,
    RunningWorker,
    activity,
    as_written,
    eventually,
    handler,
    missing_tool,
    running_ingress,
    signed_body,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.timeout(90)]

CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
TOKEN = "console-test-token"
SCRIPT = "<script>window.pwned = 1</script>"
WAIT_MS = 20_000  # for what the page shows after the broker and the worker moved
SCREENSHOTS = os.environ.get("RELAY_WRITE_SCREENSHOTS") == "1"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        missing_tool("chromium (apt-get install chromium chromium-driver)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Relay:
    settings: Settings
    handler: HttpHandler
    console: str  # the console's origin
    send: Any  # async (activity fields) -> message id

    @property
    def billing(self) -> HandlerSettings:
        return self.settings.handlers[0]

    async def dead_letters(self) -> list[str]:
        letters = await deadletters.list_dead_letters(self.settings, self.billing, 100)
        return [letter.id for letter in letters]


@pytest.fixture
async def relay(vhost: str, http_handler: HttpHandler) -> AsyncIterator[Relay]:
    """Ingress, worker and console of one handler, `billing-<suffix>`, that parks after two
    failures in a row and probes every 0.3 s; the overview refreshes twice a second."""
    billing = handler({"url": http_handler.url}, name="billing", max_attempts=2,
                      backoff_max_ms=300)  # fmt: skip
    raw = settings_dict(uuid.uuid4().hex[:8], url=vhost, handlers=[billing],
                        console={"token": TOKEN, "refresh_seconds": 0.5})  # fmt: skip
    with as_written():
        settings = config_from_dict(raw)
    source = settings.sources[0]
    async with contextlib.AsyncExitStack() as stack:
        ingress = await stack.enter_async_context(running_ingress(settings))
        worker = RunningWorker(settings)
        stack.push_async_callback(worker.stop)
        await worker.started()
        console = TestServer(create_app(settings), host="127.0.0.1")
        await console.start_server()
        stack.push_async_callback(console.close)

        async def send(**fields: Any) -> str:
            body = signed_body(source, activity(**fields))
            status, answer, _ = await ingress.post(source.path, body)
            assert status == 200, answer
            return str(answer["id"])

        yield Relay(settings, http_handler, str(console.make_url("")).rstrip("/"), send)


async def logged_in(browser: Browser, relay: Relay, path: str = "/") -> Page:
    """A page of a new browser context (in Paris time), logged in as an operator, at `path`."""
    context = await browser.new_context(timezone_id="Europe/Paris",
                                        viewport={"width": 1200, "height": 760})  # fmt: skip
    page = await context.new_page()
    await page.goto(relay.console + path)
    await page.fill("input[name=who]", "ann")
    await page.fill("input[name=token]", TOKEN)
    await page.click("form.stack button")
    await page.wait_for_url(relay.console + path)
    return page


async def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        await page.screenshot(path=ROOT / "docs" / f"console-{name}.png", full_page=True)


async def test_the_overview_shows_a_handler_parked_then_live_again_without_a_reload(
    browser: Browser, relay: Relay
) -> None:
    page = await logged_in(browser, relay)
    await page.evaluate("window.notReloaded = true")
    row = page.locator(f"tbody[data-handler='{relay.billing.name}'] .handler-row")

    # When its endpoint fails, the handler parks
    relay.handler.default = 503
    await relay.send()
    await expect(row.locator(".state")).to_have_text("parked", timeout=WAIT_MS)
    since = row.locator("time")
    assert (await since.get_attribute("title") or "").endswith(" UTC")  # UTC on hover
    assert "HTTP 503" in await row.inner_text()
    await screenshot(page, "overview")

    # When it recovers, the probe delivers and it is live again, in the same page
    relay.handler.default = 200
    await expect(row.locator(".state")).to_have_text("live", timeout=WAIT_MS)
    assert await page.evaluate("window.notReloaded") is True


async def test_a_dead_letter_shows_a_script_as_text_is_replayed_and_its_journey_found(
    browser: Browser, relay: Relay
) -> None:
    # Given a webhook whose body holds a script, refused with 422: dead-lettered
    relay.handler.default = 422
    refused = await relay.send(Message=SCRIPT)
    await eventually(relay.dead_letters, interval=0.2, what="the dead letter")
    relay.handler.default = 200

    page = await logged_in(browser, relay, f"/handlers/{relay.billing.name}/dead-letters")
    letter = page.locator("article.letter", has_text=refused)
    await expect(letter.locator("pre.body")).to_contain_text(SCRIPT)  # shown as text
    assert await page.evaluate("window.pwned") is None  # and never run
    await screenshot(page, "dead-letters")

    # When it is selected, replayed and the replay confirmed
    await letter.locator("input[name=id]").check()
    await page.click("button[value=replay]")
    await page.click("#confirm")

    # Then the page says so and the handler receives it
    await expect(page.locator(".notice")).to_contain_text("1 dead letter(s)")
    await eventually(lambda: refused in relay.handler.accepted(), what="the replayed webhook")
    assert await relay.dead_letters() == []

    # and its journey, found by id, shows both
    await page.goto(relay.console + "/journey")
    await page.fill("input[name=q]", refused)
    await page.click(".search button")
    journey = page.locator("section.journey")
    await expect(journey.locator("tbody tr").first).to_contain_text("dead-lettered")
    await expect(journey).to_contain_text("replayed")
    await screenshot(page, "journey")

    # and from there, the archive replay of the handler since it was accepted: counted first
    await journey.get_by_text("since then").click()
    await page.click("form.stack button")
    await expect(page.locator("section.count h2")).to_contain_text("Would replay 1 webhook(s)")
    await page.click("#confirm")
    await expect(page.locator(".notice")).to_contain_text("1 webhook(s) queued")
    await eventually(lambda: relay.handler.accepted().count(refused) == 2, what="archive replay")


@contextlib.asynccontextmanager
async def forging_site(target: str) -> AsyncIterator[str]:
    """Another origin (same host, another port) whose page posts a replay form to `target`
    as soon as it loads, as a site an operator visits while logged in could."""
    forged = (f'<form method="post" action="{target}"><input name="id" value="x">'
              '<input name="csrf" value="guessed"></form>'
              "<script>document.forms[0].submit()</script>")  # fmt: skip

    async def forging_page(_: web.Request) -> web.Response:
        return web.Response(text=forged, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", forging_page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()


async def test_a_replay_without_a_login_or_from_another_site_is_refused(
    browser: Browser, relay: Relay
) -> None:
    relay.handler.default = 422
    refused = await relay.send()
    await eventually(relay.dead_letters, interval=0.2, what="the dead letter")
    replay = f"{relay.console}/handlers/{relay.billing.name}/dead-letters/replay"

    # Without a login: a form posted from the console's own origin
    stranger = await (await browser.new_context()).new_page()
    await stranger.goto(relay.console + "/login")
    status = await stranger.evaluate(
        "async ([url, id]) => (await fetch(url, {method: 'POST', body: new URLSearchParams("
        "{id: id})})).status",
        [replay, refused],
    )
    assert status == 403

    # Logged in, a page of another origin posting the form
    page = await logged_in(browser, relay)
    async with forging_site(replay) as evil:
        await page.goto(evil)
        await expect(page.locator(".error")).to_contain_text("sent from another site")

    assert await relay.dead_letters() == [refused]
    assert refused not in relay.handler.accepted()
