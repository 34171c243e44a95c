"""What `relay console`'s overview costs the console: 20 handlers of 16 partitions.

    python -m tests.bench.console [--handlers 20] [--partitions 16] [--runs 30] [--broker]

- **render**: the overview page built from a `relay status` reading given in memory (every
  partition parked with a reason, so every cell is filled): the templates, escaping included,
  timed in this process.
- **request**: `GET /` and `GET /fragments/overview` answered by the console app on loopback with
  that reading, as a browser gets them (HTTP, the guard, the security headers), timed at the
  client (the stand-in reading costs nothing, so the console's cache of it changes nothing).
- **--broker**: the same handlers declared in a vhost of their own on $RELAY_AMQP_URL's broker
  (created and deleted here, with `rabbitmqctl`), and `relay status`'s own read of them (the
  management API and the relay.state stream) timed, then `GET /` when that read is fresh in the
  console's cache and when most requests find it stale (the next read then runs behind them).

Medians of the runs, and the slowest run, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.test_utils import TestServer

from relay.config import from_dict
from relay.console.app import create_app
from relay.console.render import QueueLinks, page
from relay.ops import status
from relay.ops import topology as declared
from relay.ops.status import HandlerStatus, PartitionStatus, Status
from relay.settings import Settings
from tests.bench.common import AMQP_URL
from tests.support import management

SINCE = "2026-12-07T14:02:00.123456+00:00"


def config(handlers: int, partitions: int, url: str, refresh: float = 5.0) -> Settings:
    """Settings of `handlers` handlers; the console reads `relay status` again once half of
    `refresh` has gone by."""
    return from_dict({
        "broker": {"url": url},
        "console": {"public_read": True, "refresh_seconds": refresh},
        "sources": [{"name": "envoice", "path": "/webhooks/envoice", "scheme": "envoice",
                     "secrets": ["bench-secret"]}],
        "handlers": [
            {"name": f"handler-{i}", "events": ["envoice.#"], "url": "http://127.0.0.1:1/",
             "partitions": partitions}
            for i in range(handlers)
        ],
    })  # fmt: skip


def reading(settings: Settings) -> Status:
    """A `relay status` reading with every cell filled: each partition parked, with a reason."""

    def parked(queue: str) -> PartitionStatus:
        return PartitionStatus(queue=queue, ready=1234, unacked=56, consumers=2, state="parked",
                               detail="HTTP 503 <Service Unavailable>", since=SINCE,
                               acked_per_second=12.5)  # fmt: skip

    handlers = [
        HandlerStatus(
            h.name, [parked(q) for q in h.queues], dead_letters=7, dead_lettered_per_second=0.4
        )
        for h in settings.handlers
    ]
    return Status(handlers, unrouted=3)


def timed(runs: int, call: Callable[[], Any]) -> list[float]:
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        took.append((time.perf_counter() - start) * 1000)
    return took


async def timed_async(runs: int, call: Callable[[], Awaitable[Any]]) -> list[float]:
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        took.append((time.perf_counter() - start) * 1000)
    return took


def line(what: str, took: list[float], note: str = "") -> None:
    print(f"{what:<52} median {statistics.median(took):7.1f} ms   max {max(took):7.1f} ms"
          f"{'   ' + note if note else ''}")  # fmt: skip


async def get(client: aiohttp.ClientSession, path: str) -> int:
    async with client.get(path) as answer:
        body = await answer.read()
        assert answer.status == 200, answer.status
        return len(body)


async def over_http(settings: Settings, read: Any, runs: int, label: str) -> None:
    server = TestServer(create_app(settings, read), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as client:
            size = await get(client, "/")  # warm: templates compiled
            for path in ("/", "/fragments/overview"):
                took = await timed_async(runs, lambda p=path: get(client, p))  # type: ignore[misc]
                line(f"{label} GET {path}", took, f"{size:,} bytes" if path == "/" else "")
    finally:
        await server.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handlers", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--broker", action="store_true", help="also against the real broker")
    args = parser.parse_args()
    settings = config(args.handlers, args.partitions, AMQP_URL)
    found = reading(settings)
    print(f"{args.handlers} handlers x {args.partitions} partitions, {args.runs} runs each")

    def render() -> str:
        return page("overview.html", status=found, error="", read_at=SINCE, refresh=5.0,
                    title="Overview", session=None, notice="", may_act=False,
                    queue_url=QueueLinks(settings))  # fmt: skip

    render()  # templates compiled
    line("render (templates, in process)", timed(args.runs, render))

    async def stand_in(_: Settings, **__: Any) -> Status:
        return found

    await over_http(settings, stand_in, args.runs, "request, reading given:")
    if args.broker:
        await on_broker(args)


async def on_broker(args: argparse.Namespace) -> None:
    """Refused when the queues would take over a quarter of the node's file descriptors: on
    RabbitMQ 3.10 with 1024 of them, 340 quorum queues and 20 streams starved its file handle
    cache, and the vhost's deletion then waited for ever on a classic queue waiting for a
    handle, every connection's close behind it (docs/PERFORMANCE.md, "The console")."""
    queues = args.handlers * (args.partitions + 2)  # partitions, dead letters, outcome log
    async with management(AMQP_URL) as api, api.get("/api/nodes") as nodes:
        fds = min(int(node.get("fd_total") or 0) for node in await nodes.json())
    if queues > fds / 4:
        raise SystemExit(f"--broker: {queues} queues, and the node has {fds} file descriptors")
    vhost = f"relay-bench-console-{uuid.uuid4().hex[:6]}"
    url = urlsplit(AMQP_URL)._replace(path=f"/{vhost}").geturl()
    grant = {"configure": ".*", "write": ".*", "read": ".*"}
    async with management(AMQP_URL) as api:
        async with api.put(f"/api/vhosts/{vhost}") as created:
            created.raise_for_status()
        user = urlsplit(AMQP_URL).username or "guest"
        async with api.put(f"/api/permissions/{vhost}/{user}", json=grant) as granted:
            granted.raise_for_status()
        try:
            settings = config(args.handlers, args.partitions, url)
            start = time.perf_counter()
            await declared.converge(settings, dry_run=False, prune=False)
            print(f"(declared {args.handlers * (args.partitions + 1)} quorum queues in "
                  f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
            runs = max(3, args.runs // 5)
            took = await timed_async(runs, lambda: status.status(settings, read_unrouted=False))
            line("broker: relay status's read (management API, states)", took)
            await over_http(settings, None, runs, "broker, refresh 5 s:")
            # Stale a quarter second after each read: most requests start the next one
            stale = config(args.handlers, args.partitions, url, 0.5)
            await over_http(stale, None, runs, "broker, refresh 0.5 s:")
        finally:
            # Deleting hundreds of quorum queues takes longer than the session's 10 s
            long = aiohttp.ClientTimeout(300)
            async with api.delete(f"/api/vhosts/{vhost}", timeout=long) as deleted:
                deleted.raise_for_status()


if __name__ == "__main__":
    asyncio.run(main())
