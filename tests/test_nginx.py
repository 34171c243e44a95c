"""A real load balancer: nginx (Debian's package) on loopback in front of two `relay ingress`
processes of one config, one `relay worker` and an HTTP handler.

nginx runs the production config, deploy/nginx.conf, with only what must differ here substituted
(see `nginx_config`): webhooks through it are accepted by both ingresses and delivered once, in
order; an ingress killed (-9) under load loses no accepted webhook, and at most the requests it
had in flight are refused (the provider sends them again); a SIGTERM'd ingress fails its /readyz
at once, finishes the requests it has (a body still arriving too), exits 0, and nginx passes
everything else to the other one.

Open-source nginx checks upstreams passively only (max_fails, fail_timeout): a replica that stops
listening refuses the connection, one that closes a connection resets it, and nginx passes the
request on once (`proxy_next_upstream error timeout non_idempotent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from relay.settings import SourceSettings
from tests.handlers_for_tests import HttpHandler
from tests.processes import (
    EXIT_SECONDS,
    STARTUP_SECONDS,
    Config,
    EnvoiceSender,
    Relay,
    RelayProcess,
    billing_handler,
    free_port,
    http_deliveries,
    in_background,
)
from tests.support import ROOT, activity, eventually, missing_tool, signed_body

pytestmark = pytest.mark.rabbit

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
INSTALL = "apt-get install -y --no-install-recommends nginx"
NGINX_START_SECONDS = 10.0
NGINX_STOP_SECONDS = 10.0
DELIVERY_SECONDS = 45.0  # for everything accepted to be delivered
TRAFFIC_SECONDS = 30.0  # for a few hundred webhooks to be accepted under load
# Each test's timeout is the sum of its waits: the worker consuming and both ingresses ready,
# nginx answering, then the test's own; MARGIN for the rest (sending, fixtures).
SETUP = 2 * STARTUP_SECONDS + NGINX_START_SECONDS
POLL = 10.0  # eventually()'s default deadline
MARGIN = 20.0
SENDERS = 20  # invoices sent concurrently under load, each one webhook at a time
# Envoice through nginx: a webhook not answered 200 (nginx's 502, relay's 503, a connection
# error) is sent again, the same id, soon; an answer may take nginx's proxy_read_timeout (15 s).
PROVIDER = {"retry_seconds": 0.05, "timeout_seconds": 20.0}


# --- nginx ------------------------------------------------------------------------------------


def replace_once(text: str, old: str, new: str) -> str:
    """`text` with `old`, which must occur exactly once, replaced: a production config that
    changes shape fails here, rather than being tested as something else."""
    assert text.count(old) == 1, f"deploy/nginx.conf: expected {old!r} exactly once"
    return text.replace(old, new)


def nginx_config(directory: Path, port: int, upstreams: tuple[int, int]) -> str:
    """deploy/nginx.conf, every directive as in production but:

    - it listens on 127.0.0.1:`port`, and its upstream servers are the ingresses on `upstreams`;
    - the per-client request rate is raised: it is sized for a provider's few addresses, and all
      of the tests' traffic comes from 127.0.0.1, well over 100 a second;
    - the access log, in `directory`, names the upstreams each request went to;
    - its temporary files are in `directory`.
    """
    text = NGINX_CONF.read_text(encoding="utf-8")
    for n, upstream in enumerate(upstreams, start=1):
        text = replace_once(text, f"server ingress-{n}:8080 ", f"server 127.0.0.1:{upstream} ")
    assert "ingress-" not in re.sub(r"#.*", "", text), "an upstream server left unsubstituted"
    text = replace_once(text, "listen 8080;", f"listen 127.0.0.1:{port};")
    text = replace_once(text, "rate=100r/s;", "rate=100000r/s;")
    text = replace_once(
        text,
        "access_log /dev/stdout;",
        "log_format upstreams '$uri|$status|$upstream_addr|$upstream_status';\n"
        f"    access_log {directory / 'access.log'} upstreams;",
    )
    temp = "".join(
        f"\n    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return replace_once(text, "http {", "http {" + temp)


@dataclass(frozen=True, slots=True)
class AccessLine:
    """One request as nginx logged it: its answer, and each upstream tried with its answer."""

    path: str
    status: int
    upstreams: tuple[str, ...]  # "127.0.0.1:PORT", in the order tried
    statuses: tuple[str, ...]  # the upstreams' answers ("502" for a refused connection)


class Nginx:
    """nginx in the foreground (`daemon off`), its files in `directory`."""

    def __init__(self, directory: Path, port: int, process: asyncio.subprocess.Process) -> None:
        self.directory, self.port, self.process = directory, port, process

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        """What nginx wrote to stderr: its error log (production logs `warn` and up there)."""
        return (self.directory / "nginx.log").read_text(encoding="utf-8", errors="replace")

    def access(self, path: str) -> list[AccessLine]:
        """The requests for `path` nginx answered so far."""
        log = self.directory / "access.log"
        lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        parsed = (line.split("|") for line in lines)
        return [
            AccessLine(uri, int(status), tuple(addrs.split(", ")), tuple(statuses.split(", ")))
            for uri, status, addrs, statuses in parsed
            if uri == path
        ]

    async def answers(self) -> bool:
        """nginx is up with this config: `/` is its own 404."""
        if self.process.returncode is not None:
            raise AssertionError(f"nginx exited {self.process.returncode}:\n{self.output()}")
        try:
            async with aiohttp.ClientSession() as client, client.get(self.url("/")) as response:
                return response.status == 404
        except aiohttp.ClientConnectionError:
            return False

    async def stop(self) -> None:
        """SIGQUIT (graceful), then SIGKILL to nginx's process group (master and workers)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                await asyncio.wait_for(self.process.wait(), NGINX_STOP_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()


StartNginx = Callable[[int, int], Awaitable[Nginx]]


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[StartNginx]:
    """`await nginx(port_1, port_2)`: nginx on a free loopback port in front of the ingresses on
    those ports, once it answers; stopped after the test, its error log printed."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        missing_tool(f"nginx is not installed ({INSTALL}): the load-balancer tests need it")
    started: list[Nginx] = []

    async def start(*upstreams: int) -> Nginx:
        assert len(upstreams) == 2
        directory = tmp_path / f"nginx-{len(started)}"
        directory.mkdir()
        port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(nginx_config(directory, port, (upstreams[0], upstreams[1])), "utf-8")
        # As root, nginx's workers would switch to `nobody`, who cannot enter tmp_path.
        user = "user root; " if os.geteuid() == 0 else ""
        with (directory / "nginx.log").open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                binary, "-p", f"{directory}/", "-c", str(conf),
                "-g", f"daemon off; pid {directory / 'nginx.pid'}; {user}",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: workers are killed with it
            )  # fmt: skip
        started.append(Nginx(directory, port, process))
        await eventually(
            started[-1].answers, timeout=NGINX_START_SECONDS, interval=0.05, what="nginx answers"
        )
        return started[-1]

    yield start
    for server in started:
        await server.stop()
        print(f"--- nginx (exit {server.process.returncode}):\n{server.output()}")


# --- relay behind it --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replica:
    """A `relay ingress` process and the port it serves."""

    process: RelayProcess
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def readyz(self) -> str:
        """Its /readyz, asked directly on a new connection: "200", "503" or "refused"."""
        connector = aiohttp.TCPConnector(force_close=True)
        timeout = aiohttp.ClientTimeout(total=2)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as client,
                client.get(self.url("/readyz")) as response,
            ):
                return str(response.status)
        except aiohttp.ClientConnectorError:
            return "refused"

    async def accepted(self, source: str = "envoice") -> int:
        """Webhooks it answered 200, by its own /metrics."""
        async with aiohttp.ClientSession() as client, client.get(self.url("/metrics")) as answer:
            text = await answer.text()
        line = rf'^relay_ingress_requests_total\{{source="{source}",status="200"\}} (\S+)$'
        found = re.search(line, text, flags=re.MULTILINE)
        return int(float(found.group(1))) if found else 0


@dataclass(frozen=True, slots=True)
class Balanced:
    """Two ingress processes of one config behind nginx, and a worker."""

    config: Config
    replicas: tuple[Replica, Replica]
    worker: RelayProcess
    nginx: Nginx

    @property
    def source(self) -> SourceSettings:
        return self.config.settings.sources[0]

    @property
    def webhook_url(self) -> str:
        return self.nginx.url(self.source.path)

    async def accepted(self) -> list[int]:
        """Webhooks each ingress answered 200, by its own /metrics."""
        return [await replica.accepted() for replica in self.replicas]

    def access(self) -> list[AccessLine]:
        """The webhooks nginx answered so far."""
        return self.nginx.access(self.source.path)


async def behind_nginx(relay: Relay, nginx: StartNginx, handler: HttpHandler) -> Balanced:
    """Two `relay ingress` of one config (its port and another), a worker, nginx in front."""
    config = relay.config(billing_handler(handler))
    ports = (config.settings.ingress.port, free_port())
    processes = [await relay.run("ingress", "--port", str(port), config=config) for port in ports]
    replicas = (Replica(processes[0], ports[0]), Replica(processes[1], ports[1]))
    worker = await relay.worker(config)  # its handler's queues exist before any webhook

    async def both_ready() -> bool:
        for replica in replicas:
            replica.process.check_running()
        return [await replica.readyz() for replica in replicas] == ["200", "200"]

    await eventually(both_ready, timeout=STARTUP_SECONDS, what="both ingresses ready")
    return Balanced(config, replicas, worker, await nginx(*ports))


class HeldWebhook:
    """A webhook POSTed straight to one ingress with `Expect: 100-continue`, its body held back:
    once the ingress has answered `100 Continue`, its handler runs, waiting for the body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes):
        self._reader, self._writer, self._body = reader, writer, body

    @classmethod
    async def open(cls, port: int, path: str, body: bytes) -> HeldWebhook:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        return cls(reader, writer, body)

    async def finish(self) -> tuple[int, dict[str, Any]]:
        """Sends the body; the answer's status and JSON."""
        self._writer.write(self._body)
        await self._writer.drain()
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, flags=re.IGNORECASE)
        assert length, head
        answer: dict[str, Any] = orjson.loads(await self._reader.readexactly(int(length[1])))
        self._writer.close()
        return status, answer


async def accepted(provider: EnvoiceSender, count: int) -> None:
    """Until the provider has had `count` webhooks accepted in all, under load."""
    await eventually(
        lambda: len(provider.ledger) >= count, timeout=TRAFFIC_SECONDS, what=f"{count} accepted"
    )


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.timeout(SETUP + POLL + DELIVERY_SECONDS + MARGIN)
async def test_webhooks_through_nginx_reach_both_ingresses_and_are_delivered_once_in_order(
    relay: Relay, nginx: StartNginx, http_handler: HttpHandler
) -> None:
    # Given two ingresses of one config behind nginx, a worker and an HTTP handler
    balanced = await behind_nginx(relay, nginx, http_handler)

    # When 200 webhooks over 10 invoices are sent through nginx, each invoice's one at a time
    provider = EnvoiceSender(balanced.webhook_url, balanced.source, **PROVIDER)
    await provider.send(range(1, 11), each=20)

    # Then every one is accepted at its first try
    assert provider.count() == Counter({"200 accepted": 200})
    # by one ingress or the other, each taking some: 200 together, by their own counts
    accepted = await balanced.accepted()
    print(f"accepted by each ingress: {accepted}")
    assert sum(accepted) == 200
    assert min(accepted) > 0
    # and nginx agrees: each request went to one upstream, as many to each as it counts
    ports = [f"127.0.0.1:{replica.port}" for replica in balanced.replicas]
    await eventually(lambda: len(balanced.access()) >= 200, what="nginx's access log")
    lines = balanced.access()
    assert len(lines) == 200
    assert {(line.status, line.statuses) for line in lines} == {(200, ("200",))}
    assert [sum(line.upstreams == (port,) for line in lines) for port in ports] == accepted
    # and the handler gets every one once, each invoice's in the order accepted
    tally = await provider.ledger.delivered(
        lambda: http_deliveries(http_handler), balanced.config.settings, timeout=DELIVERY_SECONDS
    )
    print(f"tally: {tally.line()}")
    assert tally.ok, str(tally)
    assert (tally.delivered, tally.duplicates) == (200, 0)
    assert len(http_handler.requests) == 200


@pytest.mark.timeout(SETUP + 3 * TRAFFIC_SECONDS + DELIVERY_SECONDS + MARGIN)
async def test_an_ingress_killed_under_load_loses_no_webhook_it_accepted(
    relay: Relay, nginx: StartNginx, http_handler: HttpHandler
) -> None:
    # Given two ingresses behind nginx, a worker and an HTTP handler
    balanced = await behind_nginx(relay, nginx, http_handler)
    survivor, victim = balanced.replicas
    # and a provider sending 20 invoices' webhooks through nginx, each invoice's one at a time
    provider = EnvoiceSender(balanced.webhook_url, balanced.source, **PROVIDER)
    stop = asyncio.Event()
    async with in_background(provider.send(range(1, SENDERS + 1), stop=stop)) as sending:
        # When both ingresses have accepted webhooks
        await accepted(provider, 300)
        assert min(await balanced.accepted()) > 0
        # and one of them is killed (-9) with requests in flight
        in_flight = provider.in_flight
        killed_at = time.monotonic()
        await victim.process.kill()
        accepted_at_kill = len(provider.ledger)
        # and 300 more webhooks are sent
        await accepted(provider, accepted_at_kill + 300)
        stop.set()
        await asyncio.wait_for(sending, TRAFFIC_SECONDS)  # the last of each invoice, accepted

    # Then nothing was refused before the kill, and after it only as many requests as were in
    # flight then: nginx passes every new request on to the survivor when the other refuses
    answers = provider.count()
    refused = provider.refused
    print(f"answers: {dict(answers)}; in flight at the kill: {in_flight}")
    assert provider.refused_in(until=killed_at) == 0
    assert 0 < in_flight <= SENDERS
    assert refused <= in_flight
    # and every webhook sent was accepted in the end (the refused ones sent again)
    assert len(provider.ledger) == answers["200 accepted"] + answers["200 duplicate"]
    assert len(provider.ledger) >= accepted_at_kill + 300
    assert await survivor.accepted() > 0
    # and every accepted webhook is delivered, each invoice's in order
    tally = await provider.ledger.delivered(
        lambda: http_deliveries(http_handler), balanced.config.settings, timeout=DELIVERY_SECONDS
    )
    print(f"tally: {tally.line()}")
    assert tally.ok, str(tally)
    # twice at most for those in flight at the kill: the killed ingress may have published one
    # before dying, and nginx or the provider sent it again
    assert tally.duplicates <= in_flight
    # and what nginx tried at the killed ingress after the kill (refused, or reset in flight), it
    # passed on to the survivor, which took it: the provider never saw those fail
    passed_on = [line for line in balanced.access() if len(line.upstreams) > 1]
    print(f"requests nginx passed on to the other ingress: {len(passed_on)}")
    assert passed_on, "nginx passed nothing on: it never tried the killed ingress again"
    tried = (f"127.0.0.1:{victim.port}", f"127.0.0.1:{survivor.port}")
    assert {line.upstreams for line in passed_on} == {tried}
    assert {(line.status, line.statuses[-1]) for line in passed_on} == {(200, "200")}


@pytest.mark.timeout(
    SETUP + 3 * TRAFFIC_SECONDS + 5 + 10 + EXIT_SECONDS + DELIVERY_SECONDS + MARGIN
)  # 5: /readyz failing, 10: the held webhook's answer
async def test_a_sigtermed_ingress_fails_readyz_first_drains_and_nginx_passes_the_rest_on(
    relay: Relay, nginx: StartNginx, http_handler: HttpHandler
) -> None:
    # Given two ingresses behind nginx, a worker and an HTTP handler
    balanced = await behind_nginx(relay, nginx, http_handler)
    other, draining = balanced.replicas
    # and a provider sending 20 invoices' webhooks through nginx, each invoice's one at a time
    provider = EnvoiceSender(balanced.webhook_url, balanced.source, **PROVIDER)
    stop = asyncio.Event()
    async with in_background(provider.send(range(1, SENDERS + 1), stop=stop)) as sending:
        await accepted(provider, 300)
        assert min(await balanced.accepted()) > 0
        # and a webhook in flight at one ingress, sent to it directly: its handler is waiting
        # for the body
        held_id = time.time_ns() // 1000 + 7_000_000_000  # no sender uses it
        held_act = activity(Id=held_id, InvoiceId=999, InvoiceNumber="INV-999")
        body = signed_body(balanced.source, held_act)
        held = await HeldWebhook.open(draining.port, balanced.source.path, body)
        assert await draining.readyz() == "200"

        # When that ingress gets SIGTERM
        term_at = time.monotonic()
        draining.process.process.send_signal(signal.SIGTERM)
        # Then its /readyz fails while the process still runs
        readyz: str = await eventually(
            lambda: _failing(draining), timeout=5, interval=0.01, what="/readyz failing"
        )
        failed_after = time.monotonic() - term_at
        assert draining.process.running
        print(f"/readyz after SIGTERM: {readyz} within {failed_after * 1000:.0f} ms")
        assert readyz == "refused"  # it stopped listening (docs/COMMANDS.md: SIGTERM drains)
        # and the webhook in flight is accepted once its body arrives
        status, answer = await held.finish()
        assert (status, answer) == (200, {"status": "accepted", "id": f"envoice:{held_id}"})
        provider.ledger.accept("invoice:999", f"envoice:{held_id}")
        # and the process exits 0, having drained
        assert await draining.process.exit_code() == 0
        exited_at = time.monotonic()
        assert draining.process.logged("ingress draining") == 1
        # and nginx sends the next 300 webhooks to the other ingress
        other_before = await other.accepted()
        accepted_at_exit = len(provider.ledger)
        await accepted(provider, accepted_at_exit + 300)
        stop.set()
        await asyncio.wait_for(sending, TRAFFIC_SECONDS)
    assert await other.accepted() - other_before >= 300

    # Then no request through nginx failed, during the drain or after it: what the draining
    # ingress refused, nginx passed on to the other
    answers = provider.count()
    print(f"answers: {dict(answers)}; drain took {(exited_at - term_at) * 1000:.0f} ms")
    print(f"during the drain: {dict(provider.count(term_at, exited_at))}")
    passed_on = [line for line in balanced.access() if len(line.upstreams) > 1]
    print(f"requests nginx passed on to the other ingress: {len(passed_on)}")
    assert provider.refused == 0, dict(answers)
    # (nginx tried the draining ingress after it stopped listening: max_fails=3 before it rests)
    assert passed_on, "nginx passed nothing on: it never tried the draining ingress again"
    tried = (f"127.0.0.1:{draining.port}", f"127.0.0.1:{other.port}")
    assert {line.upstreams for line in passed_on} == {tried}
    assert {(line.status, line.statuses[-1]) for line in passed_on} == {(200, "200")}
    # and every accepted webhook is delivered, each invoice's in order, the held one too
    tally = await provider.ledger.delivered(
        lambda: http_deliveries(http_handler), balanced.config.settings, timeout=DELIVERY_SECONDS
    )
    print(f"tally: {tally.line()}")
    assert tally.ok, str(tally)
    assert tally.duplicates == 0


async def _failing(replica: Replica) -> str | None:
    """The replica's /readyz answer when it is not 200."""
    answer = await replica.readyz()
    return None if answer == "200" else answer
