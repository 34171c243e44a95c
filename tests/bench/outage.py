"""A long handler outage at scale: what a backlog of --sizes messages costs, and how it drains.

For each size, in a vhost of its own (created here, deleted in a finally): `relay topology
declare`, an HTTP endpoint that answers 503 (a handler down), `relay worker` running against it
(so the handler parks, as in a real outage), then N messages over --keys invoices published
straight to the source exchange by relay's own publisher (relay.publisher.Publisher: the
ingress's confirmed fast path and wire format, without HTTP or signatures, which would make a
million take an hour here). Parked and full, it reads:

- the broker's memory (management API `mem_used`) before and after, and of it the quorum
  queues' index (`quorum_queue_procs`, per message) and the Raft write-ahead log's entries held
  in memory (`quorum_ets` + `binary`, freed when the log rolls over at
  `raft.wal_max_size_bytes`, 512 MiB by default: bounded, not per message);
- the node's data directory on disk (du; the whole node's, so other vhosts' traffic is noise);
- the worker's RSS while parked (its peak through the fill, and after);
- `relay status` wall time (the CLI, a new process each time, median of 3), against the same
  command on the empty vhost before the fill.

Then the endpoint answers 200 and the drain is measured at the endpoint: delivered/s (distinct
ids over first to last delivery), each key's ids in increasing order (reordered counted), the
duplicates, and what was not delivered. A size above --full-drain-max drains for --window
seconds only (its rate over that window), then the vhost is deleted with what is left. Last, a
line fit through the two sizes extrapolates memory, disk and status time to a day at 100/s
(8.64 M messages), and the drain time from the larger size's rate.

    python -m tests.bench.outage                                # 200000 and 1000000
    python -m tests.bench.outage --sizes 20000 100000 --json

Needs RabbitMQ on $RELAY_AMQP_URL with its management API on port 15672 (guest) and, for the
disk figure, read access to --data-dir. Aborts a fill if the broker's memory passes half its
watermark. Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from relay.config import load as load_config
from relay.errors import RelayError
from relay.providers import Event
from relay.publisher import Publisher
from tests.bench.common import (
    AMQP_URL,
    SOURCE_CONFIG,
    STARTUP_SECONDS,
    BenchError,
    Child,
    free_port,
    memory_kb,
    wait_ok,
)

DAY = 100 * 86_400  # messages a handler down for a day leaves at 100 webhooks/s
IN_FLIGHT = 2000  # publishes awaiting their confirm
PUBLISH_TIMEOUT_SECONDS = 300.0
FILL_SECONDS = 1800.0
QUEUED_SECONDS = 120.0  # for the management API to count what was confirmed
PARKED_SECONDS = 120.0
STATUS_ROUNDS = 3
POLL_SECONDS = 1.0
MEMORY_ABORT = 0.5  # of the broker's memory watermark: the fill stops beyond it
NAN = float("nan")
DATA = orjson.dumps({"Id": 1, "Type": 11, "InvoiceId": 42, "Message": "x" * 200})

CONFIG = (
    SOURCE_CONFIG
    + """[worker]
metrics_port = {metrics}
[[handlers]]
name = "outage"
events = ["envoice.#"]
url = "{url}"
partitions = {partitions}
backoff_max_ms = {probe_ms}
"""
)

# argv: port, messages, latency ms. Answers 503 until POST /recover; then counts per key.
ENDPOINT = """
import asyncio, sys, time
import orjson, uvloop
from aiohttp import web
size, latency = int(sys.argv[2]), float(sys.argv[3]) / 1000
seen, last = bytearray(size), {}
stats = {"refused": 0, "distinct": 0, "duplicates": 0, "reordered": 0, "first": 0.0, "last": 0.0}
up = False
async def hook(request):
    body = orjson.loads(await request.read())
    if not up:
        stats["refused"] += 1
        return web.Response(status=503)
    await asyncio.sleep(latency) if latency else None
    seq, key, now = int(body["id"].split(":")[1]), body["key"], time.time()
    if seen[seq]:
        stats["duplicates"] += 1
    else:
        seen[seq] = 1
        stats["distinct"] += 1
        stats["first"] = stats["first"] or now
        stats["last"] = now
        if seq < last.get(key, -1):
            stats["reordered"] += 1
        last[key] = max(seq, last.get(key, -1))
    return web.Response()
async def recover(request):
    global up
    up = True
    return web.Response()
async def report(request):
    return web.Response(body=orjson.dumps(stats), content_type="application/json")
async def main():
    app = web.Application()
    app.add_routes([web.post("/hook", hook), web.post("/recover", recover),
                    web.get("/stats", report)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]), backlog=1024).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""


@dataclass
class Size:
    messages: int  # confirmed by the broker
    failed: int  # publishes not confirmed (not counted as lost)
    fill_rate: float  # confirmed/s
    broker_mb_before: float
    broker_mb_after: float
    quorum_index_mb: float  # the broker's quorum_queue_procs, after
    wal_memory_mb: float  # the broker's quorum_ets + binary, after
    disk_mb_delta: float  # the node's data directory, after the fill minus before
    worker_rss_mb_parked: float  # after the fill
    worker_peak_rss_mb: float  # VmHWM through the fill and the drain
    status_seconds_empty: float  # median wall time of `relay status`, empty vhost
    status_seconds_full: float
    refused_while_down: int  # 503s the endpoint answered: retries, then probes
    drain_full: bool  # drained to the last message, else for --window seconds
    recovery_seconds: float  # from the endpoint's recovery to its first delivery (the probe)
    drain_rate: float  # distinct ids delivered/s
    delivered: int
    reordered: int  # deliveries of a key's id after a later id of the same key
    duplicates: int
    lost: int  # full drain only: confirmed, never delivered


class Broker:
    """The management API of the broker behind AMQP_URL: vhosts, memory, queue counts."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        amqp = URL(AMQP_URL)
        self.base = URL.build(scheme="http", host=amqp.host or "127.0.0.1", port=15672)
        login = f"{amqp.user or 'guest'}:{amqp.password or 'guest'}".encode()
        self.headers = {"Authorization": "Basic " + base64.b64encode(login).decode()}
        self.session = session

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        url = self.base.with_path("/api/" + path, encoded=True)
        async with self.session.request(method, url, json=body, headers=self.headers) as response:
            response.raise_for_status()
            return await response.json(content_type=None) if response.status == 200 else None

    async def add_vhost(self, vhost: str) -> None:
        await self.call("PUT", f"vhosts/{quote(vhost, safe='')}")
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        await self.call("PUT", f"permissions/{quote(vhost, safe='')}/guest", permissions)

    async def delete_vhost(self, vhost: str) -> None:
        await self.call("DELETE", f"vhosts/{quote(vhost, safe='')}")

    async def memory(self) -> tuple[float, float, float]:
        """MB used, MB of the quorum queues' index, MB of the write-ahead log held in memory."""
        node = (await self.call("GET", "nodes"))[0]
        detail = await self.call("GET", f"nodes/{quote(node['name'], safe='')}/memory")
        parts = detail["memory"]
        wal = parts.get("quorum_ets", 0) + parts.get("binary", 0)
        return node["mem_used"] / 2**20, parts.get("quorum_queue_procs", 0) / 2**20, wal / 2**20

    async def watermark(self) -> float:
        """MB of the broker's memory watermark."""
        return float((await self.call("GET", "nodes"))[0]["mem_limit"]) / 2**20

    async def queued(self, vhost: str, prefix: str) -> int:
        queues = await self.call("GET", f"queues/{quote(vhost, safe='')}")
        return sum(q.get("messages") or 0 for q in queues if q["name"].startswith(prefix))


def disk_mb(directory: Path) -> float:
    """The size of `directory` on disk in MB (nan if unreadable)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total / 2**20 if total else float("nan")


async def fill(publisher: Publisher, size: int, keys: int, broker: Broker) -> tuple[int, int]:
    """Publish `size` messages, key seq % `keys`, in seq order; (confirmed, failed)."""
    limit, tasks = asyncio.Semaphore(IN_FLIGHT), set()
    counts = {"confirmed": 0, "failed": 0}
    watermark = await broker.watermark()
    checked = time.monotonic()

    async def one(event: Event) -> None:
        try:
            await publisher.publish(event)
            counts["confirmed"] += 1
        except RelayError:
            counts["failed"] += 1
        finally:
            limit.release()

    async with asyncio.timeout(FILL_SECONDS):
        for seq in range(size):
            await limit.acquire()
            event = Event(id=str(seq), source="envoice", name="paid", type=11,
                          key=f"invoice:{seq % keys}", occurred_at=None, data=None,
                          data_json=DATA)  # fmt: skip
            task = asyncio.create_task(one(event))  # started in creation order: seq order
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if time.monotonic() - checked > 2:
                checked = time.monotonic()
                used, _, _ = await broker.memory()
                if used > MEMORY_ABORT * watermark:
                    raise BenchError(
                        f"broker memory {used:.0f} MB past {MEMORY_ABORT:g} of its watermark "
                        f"({watermark:.0f} MB) after {seq} messages"
                    )
        if tasks:
            await asyncio.wait(tasks)
    return counts["confirmed"], counts["failed"]


async def until(what: str, seconds: float, check: Any) -> None:
    """Poll the coroutine function `check` until it returns true; BenchError after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {seconds:g} s")
        await asyncio.sleep(POLL_SECONDS)


async def status_seconds(config: Path, directory: Path, amqp_url: str) -> float:
    """Median wall time of `relay status` (a new process each time, as an operator runs it)."""
    times = []
    for n in range(STATUS_ROUNDS):
        started = time.monotonic()
        child = await Child.start("status", directory / f"status-{n}.log", "-m", "relay",
                                  "status", "--config", str(config), amqp_url=amqp_url)  # fmt: skip
        if await asyncio.wait_for(child.process.wait(), 600) != 0:
            raise BenchError(f"relay status failed:\n{child.log_tail()}")
        times.append(time.monotonic() - started)
    return round(statistics.median(times), 2)


async def measure(args: argparse.Namespace, size: int, directory: Path) -> Size:
    vhost = f"relay-outage-{os.getpid()}-{size}"
    amqp_url = str(URL(AMQP_URL).with_path("/" + quote(vhost, safe=""), encoded=True))
    metrics, port = free_port(), free_port()
    config = directory / f"{size}.toml"
    config.write_text(
        CONFIG.format(exchange="relay.bench-outage", port=free_port(), path="/webhooks/envoice",
                      secret="bench-secret", metrics=metrics, partitions=args.partitions,
                      url=f"http://127.0.0.1:{port}/hook", probe_ms=args.probe_ms),
        encoding="utf-8",
    )  # fmt: skip
    os.environ["RELAY_AMQP_URL"] = amqp_url  # for the publisher's settings
    settings = load_config(config)
    # Another user's memory alarm blocks publishes for a while: wait it out rather than fail
    # messages that the broker may still store (their late confirms then count nowhere).
    broker_settings = replace(settings.broker, publish_timeout_seconds=PUBLISH_TIMEOUT_SECONDS)
    settings = replace(settings, broker=broker_settings)
    children: list[Child] = []
    timeout = aiohttp.ClientTimeout(60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        broker = Broker(session)
        await broker.add_vhost(vhost)
        try:

            def relay(name: str, *command: str) -> Any:
                return Child.start(name, directory / f"{size}-{name}.log", "-m", "relay",
                                   *command, "--config", str(config), "--log-level", "warning",
                                   amqp_url=amqp_url)  # fmt: skip

            declare = await relay("topology", "topology", "declare")
            if await asyncio.wait_for(declare.process.wait(), STARTUP_SECONDS) != 0:
                raise BenchError(f"relay topology declare failed:\n{declare.log_tail()}")
            log = directory / f"{size}-endpoint.log"
            endpoint = await Child.start("endpoint", log, "-c", ENDPOINT, str(port), str(size),
                                         str(args.latency_ms))  # fmt: skip
            children.append(endpoint)
            await wait_ok(session, f"http://127.0.0.1:{port}/stats", endpoint)
            status_empty = await status_seconds(config, directory, amqp_url)
            worker = await relay("worker", "worker")
            children.append(worker)
            await wait_ok(session, f"http://127.0.0.1:{metrics}/metrics", worker)
            broker_before, _, _ = await broker.memory()
            disk_before = disk_mb(args.data_dir)

            publisher = Publisher(settings)
            publisher.start()
            try:
                await until("publisher ready", STARTUP_SECONDS, _ready(publisher))
                started = time.monotonic()
                confirmed, failed = await fill(publisher, size, args.keys, broker)
                fill_rate = round(confirmed / (time.monotonic() - started), 1)
            finally:
                await publisher.stop()
            worker.check_alive()

            async def parked() -> bool:
                async with session.get(f"http://127.0.0.1:{metrics}/metrics") as response:
                    text = await response.text()
                return 'relay_handler_state{handler="outage",state="parked"} 1.0' in text

            async def counted() -> bool:
                return await broker.queued(vhost, "relay.outage.") >= confirmed

            await until("handler parked", PARKED_SECONDS, parked)
            await until("backlog counted by the broker", QUEUED_SECONDS, counted)
            broker_after, quorum_index, wal_memory = await broker.memory()
            disk_after = disk_mb(args.data_dir)
            rss_parked = memory_kb(worker.process.pid, "VmRSS") / 1024
            status_full = await status_seconds(config, directory, amqp_url)

            async def stats() -> dict[str, Any]:
                async with session.get(f"http://127.0.0.1:{port}/stats") as response:
                    found: dict[str, Any] = await response.json()
                    return found

            refused = (await stats())["refused"]
            full = size <= args.full_drain_max
            async with session.post(f"http://127.0.0.1:{port}/recover") as response:
                response.raise_for_status()
            recovered = time.time()
            deadline = time.monotonic() + (args.drain_max_seconds if full else args.window)
            found = await stats()
            while found["distinct"] < confirmed and time.monotonic() < deadline:
                worker.check_alive()
                await asyncio.sleep(POLL_SECONDS)
                found = await stats()
            peak = memory_kb(worker.process.pid, "VmHWM") / 1024
            span = found["last"] - found["first"]
            return Size(
                messages=confirmed, failed=failed, fill_rate=fill_rate,
                broker_mb_before=round(broker_before), broker_mb_after=round(broker_after),
                quorum_index_mb=round(quorum_index), wal_memory_mb=round(wal_memory),
                disk_mb_delta=round(disk_after - disk_before),
                worker_rss_mb_parked=round(rss_parked, 1), worker_peak_rss_mb=round(peak, 1),
                status_seconds_empty=status_empty, status_seconds_full=status_full,
                refused_while_down=refused, drain_full=full,
                recovery_seconds=round(found["first"] - recovered, 1) if found["first"] else -1,
                drain_rate=round(found["distinct"] / span, 1) if span > 0 else 0.0,
                delivered=found["distinct"], reordered=found["reordered"],
                duplicates=found["duplicates"],
                lost=confirmed - found["distinct"] if full else 0,
            )  # fmt: skip
        finally:
            for child in reversed(children):
                await child.stop()
            try:
                await broker.delete_vhost(vhost)
            except aiohttp.ClientError as exc:
                print(f"warning: vhost {vhost} not deleted ({exc!r}): delete it", file=sys.stderr)


def _ready(publisher: Publisher) -> Any:
    async def check() -> bool:
        return publisher.ready

    return check


def extrapolate(small: Size, large: Size) -> dict[str, float]:
    """Lines through the two sizes, read at DAY messages. `relay status` is fitted by least
    squares through four points, each size's empty vhost counting as 0 messages: its time is
    mostly a process starting, and two points alone make a slope of the noise. The write-ahead
    log held in memory is not extrapolated: it is bounded by the log's size, not per message."""

    def at_day(field: str) -> float:
        x0, x1 = small.messages, large.messages
        y0, y1 = float(getattr(small, field)), float(getattr(large, field))
        slope = (y1 - y0) / (x1 - x0)
        return round(y0 + slope * (DAY - x0), 1)

    points = [(0, small.status_seconds_empty), (0, large.status_seconds_empty),
              (small.messages, small.status_seconds_full),
              (large.messages, large.status_seconds_full)]  # fmt: skip
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x, _ in points
    )
    net = large.drain_rate - DAY / 86_400  # webhooks keep arriving at 100/s meanwhile
    return {
        "broker MB (mem_used), a straight line": at_day("broker_mb_after"),
        "quorum queues' index MB": at_day("quorum_index_mb"),
        "disk MB (delta)": at_day("disk_mb_delta"),
        "relay status s (least squares)": round(mean_y + slope * (DAY - mean_x), 1),
        "worker RSS MB parked": at_day("worker_rss_mb_parked"),
        "drain hours, 100/s still arriving": round(DAY / net / 3600, 1) if net > 0 else NAN,
    }


def text(result: Size) -> str:
    r = result
    drain = "full drain" if r.drain_full else "drain window"
    return (
        f"{r.messages:,} messages ({r.failed} failed, filled at {r.fill_rate:,.0f}/s): broker "
        f"{r.broker_mb_before:.0f} -> {r.broker_mb_after:.0f} MB (quorum index "
        f"{r.quorum_index_mb:.0f} MB, write-ahead log {r.wal_memory_mb:.0f} MB), disk "
        f"+{r.disk_mb_delta:.0f} MB, worker RSS parked "
        f"{r.worker_rss_mb_parked:.0f} MB (peak {r.worker_peak_rss_mb:.0f}), relay status "
        f"{r.status_seconds_full:.2f} s (empty {r.status_seconds_empty:.2f} s), "
        f"{r.refused_while_down} refused while down | {drain}: first delivery "
        f"{r.recovery_seconds:.1f} s after recovery, {r.drain_rate:,.0f}/s, {r.delivered:,} "
        f"delivered, reordered {r.reordered}, duplicates {r.duplicates}, lost {r.lost}"
    )


async def run(args: argparse.Namespace) -> list[Size]:
    running = asyncio.current_task()
    assert running is not None
    for signum in (signal.SIGTERM, signal.SIGINT):  # stopped: the vhost is deleted all the same
        asyncio.get_running_loop().add_signal_handler(signum, running.cancel)
    results = []
    with tempfile.TemporaryDirectory(prefix="relay-bench-outage-") as directory:
        for size in args.sizes:
            results.append(await measure(args, size, Path(directory)))
            if not args.json:
                print(text(results[-1]), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.outage", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", type=int, nargs=2, default=[200_000, 1_000_000])
    parser.add_argument("--keys", type=int, default=10_000, help="invoices (10000)")
    parser.add_argument("--partitions", type=int, default=4, help="handler partitions (4)")
    parser.add_argument("--latency-ms", type=float, default=0, help="endpoint latency (0)")
    probe = "the handler's backoff_max_ms: its probe interval when parked (5000)"
    parser.add_argument("--probe-ms", type=int, default=5000, help=probe)
    full = "sizes up to this drain fully, larger ones for --window seconds (200000)"
    parser.add_argument("--full-drain-max", type=int, default=200_000, help=full)
    parser.add_argument("--window", type=float, default=60.0, help="seconds (60)")
    parser.add_argument("--drain-max-seconds", type=float, default=1200.0)
    parser.add_argument("--data-dir", type=Path,
                        default=Path("/var/lib/rabbitmq/mnesia/rabbit@localhost"))  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(*args.sizes, args.keys, args.partitions) < 1 or args.sizes[0] >= args.sizes[1]:
        parser.error("--sizes: two increasing sizes >= 1; --keys, --partitions >= 1")
    try:
        results = asyncio.run(run(args))
    except asyncio.CancelledError:
        print("outage bench: stopped", file=sys.stderr)
        return 1
    except (BenchError, TimeoutError, aiohttp.ClientError) as exc:
        print(f"outage bench: {exc or repr(exc)}", file=sys.stderr)
        return 1
    fit = extrapolate(*results)
    if args.json:
        print(json.dumps({"sizes": [asdict(r) for r in results], "day": fit}, indent=2))
    else:
        print(f"extrapolated to a day at 100/s ({DAY:,} messages):")
        for label, value in fit.items():
            print(f"  {label:<40}{value:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
