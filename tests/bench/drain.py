"""How fast `relay worker` drains a backlog into an HTTP endpoint, against plain aio-pika.

Starts `relay ingress` on a temporary config (one source, one URL handler bound to "envoice.#")
and binds a baseline quorum queue to the same exchange, so every accepted webhook lands both in
the handler's partitions and in the baseline queue. Each round POSTs --count fresh webhooks over
--keys invoices (each invoice's one after another, invoices concurrently) with no worker running,
then drains the backlog twice into an aiohttp endpoint (its own subprocess, answering 200 after
--latency-ms), alternating which drain goes first:

- relay: `relay worker` (ordered per key);
- baseline: an aio-pika consumer with prefetch 50 that POSTs each message concurrently, then acks
  (no ordering).

Delivered/s = distinct ids delivered / (last first delivery - first delivery), from the
endpoint's timestamps. Each drain is checked against the accepted order: order violations (keys
whose first deliveries differ from the accepted order), duplicates, lost. The worker's peak RSS
comes from /proc/<pid>/status. From the repo root:

    python -m tests.bench.drain                                   # 10000 webhooks, 200 keys
    python -m tests.bench.drain --latency-ms 0 --rounds 3 --json

Needs RabbitMQ on $RELAY_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/). Deletes the
queues and exchanges it declared; never relay.unrouted, relay.state or relay.archive. Every wait
has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.exceptions
import aiohttp

from relay.config import load as load_config
from relay.providers import PROVIDERS
from relay.settings import SourceSettings
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

PROTECTED = frozenset({"relay.unrouted", "relay.state", "relay.archive"})  # shared: kept
SOURCE_PATH = "/webhooks/envoice"
SECRET = "bench-secret"
REQUEST_SECONDS = 10.0  # one webhook POST
LOAD_SECONDS = 600.0  # the whole load phase
RETRIES_503 = 5
INVOICES_AT_ONCE = 64
POLL_SECONDS = 0.25
SETTLE_SECONDS = 0.5  # after a drain's consumer stopped, for its last requests to be recorded
CLEANUP_SECONDS = 15.0
BASELINE_PREFETCH = 50
NAN = float("nan")

CONFIG = (
    SOURCE_CONFIG
    + """[[handlers]]
name = "{handler}"
events = ["envoice.#"]
url = "{url}"
partitions = {partitions}
"""
)

# argv: port, latency ms. Records [time, id, key] per POST /hook as it arrives.
ENDPOINT = """
import asyncio, sys, time
import orjson, uvloop
from aiohttp import web
latency, records = float(sys.argv[2]) / 1000, []
async def hook(request):
    body = orjson.loads(await request.read())
    records.append((time.time(), body["id"], body["key"]))
    await asyncio.sleep(latency) if latency else None
    return web.Response()
async def recorded(request):
    since = int(request.query.get("since", "0"))
    return web.Response(body=orjson.dumps(records[since:]), content_type="application/json")
async def clear(request):
    records.clear()
    return web.Response()
async def main():
    app = web.Application()
    app.add_routes([web.post("/hook", hook), web.get("/recorded", recorded),
                    web.post("/clear", clear)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]), backlog=1024).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""

# argv: AMQP URL, queue, endpoint URL. On SIGTERM: stops consuming, finishes what it holds.
BASELINE = f"""
import asyncio, signal, sys
import aio_pika, aiohttp, uvloop
async def main(amqp_url, queue_name, url):
    stop, tasks = asyncio.Event(), set()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    connection = await aio_pika.connect(amqp_url)
    async with connection, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count={BASELINE_PREFETCH})
        queue = await channel.get_queue(queue_name)
        async def deliver(message):
            try:
                async with http.post(url, data=message.body) as response:
                    await response.read()
            except Exception:
                await message.nack(requeue=True)
            else:
                await message.ack()
        async def on_message(message):
            tasks.add(task := asyncio.create_task(deliver(message)))
            task.add_done_callback(tasks.discard)
        tag = await queue.consume(on_message)
        await stop.wait()
        await queue.cancel(tag)
        await asyncio.wait(tasks, timeout=10) if tasks else None
uvloop.run(main(*sys.argv[1:]))
"""


_event_ids = itertools.count(time.time_ns() // 1000)


async def load(
    session: aiohttp.ClientSession, url: str, source: SourceSettings, count: int, invoices: range
) -> tuple[dict[str, list[str]], Counter[str]]:
    """POST `count` webhooks over `invoices`; per key the accepted ids in order, and failures."""
    provider = PROVIDERS[source.scheme]
    accepted: dict[str, list[str]] = {f"invoice:{n}": [] for n in invoices}
    failures: Counter[str] = Counter()
    limit = asyncio.Semaphore(INVOICES_AT_ONCE)

    async def post(invoice: int) -> None:
        event_id = next(_event_ids)
        body = provider.sample(source, event_id=event_id, key=invoice, now=time.time()).body
        for attempt in range(RETRIES_503 + 1):
            try:
                async with session.post(url, data=body) as response:
                    answer, status = await response.json(content_type=None), response.status
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                failures[type(exc).__name__] += 1
                return
            if status == 200 and answer.get("status") == "accepted":
                accepted[f"invoice:{invoice}"].append(f"envoice:{event_id}")
                return
            if status != 503 or attempt == RETRIES_503:
                failures[f"{status} {answer.get('status') or answer.get('error')}"] += 1
                return
            await asyncio.sleep(0.2)

    async def invoice(n: int, each: int) -> None:
        async with limit:
            for _ in range(each):
                await post(n)

    each, extra = divmod(count, len(invoices))
    async with asyncio.timeout(LOAD_SECONDS):
        await asyncio.gather(*(invoice(n, each + (i < extra)) for i, n in enumerate(invoices)))
    return accepted, failures


@dataclass
class Drain:
    rate: float  # distinct ids delivered per second
    delivered: int
    order_violations: int  # keys whose first deliveries are not in acceptance order
    duplicates: int  # deliveries beyond the first of an id
    lost: int  # accepted, not delivered by the deadline
    peak_rss_mb: float  # of the consumer process


async def drain(
    session: aiohttp.ClientSession,
    endpoint: str,
    consumer: Child,
    accepted: dict[str, list[str]],
    seconds: float,
) -> Drain:
    """Until every accepted id reached the endpoint (or `seconds` passed), then stop `consumer`;
    what the endpoint recorded (cleared before the consumer started) against `accepted`."""
    wanted = {i for ids in accepted.values() for i in ids}
    records: list[Any] = []  # [time, id, key] in order of arrival
    seen: set[str] = set()
    peak_kb = 0

    async def fetch() -> None:
        async with session.get(f"{endpoint}/recorded?since={len(records)}") as response:
            new = await response.json()
        records.extend(new)
        seen.update(r[1] for r in new)

    try:
        deadline = time.monotonic() + seconds
        while not wanted <= seen and time.monotonic() < deadline:
            consumer.check_alive()
            peak_kb = max(peak_kb, memory_kb(consumer.process.pid, "VmRSS"))
            await asyncio.sleep(POLL_SECONDS)
            await fetch()
        peak_kb = max(peak_kb, memory_kb(consumer.process.pid, "VmHWM"))
    finally:
        code = await consumer.stop()
    await asyncio.sleep(SETTLE_SECONDS)  # for requests still on their way
    await fetch()
    if code or not wanted <= seen:
        print(f"warning: {consumer.name} exited {code}, {len(wanted - seen)} ids not delivered;"
              f" its log ends:\n{consumer.log_tail()}", file=sys.stderr)  # fmt: skip
    times: Counter[str] = Counter()
    first: dict[str, list[str]] = {}
    stamps: list[float] = []
    for stamp, message_id, key in records:
        if message_id in wanted:  # else not this round's: never expected
            if not times[message_id]:
                first.setdefault(key, []).append(message_id)
                stamps.append(stamp)
            times[message_id] += 1
    order = [first.get(key, []) == [i for i in ids if times[i]] for key, ids in accepted.items()]
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return Drain(
        rate=round(len(times) / span, 1) if span > 0 else NAN,
        delivered=len(times),
        order_violations=order.count(False),
        duplicates=sum(times.values()) - len(times),
        lost=len(wanted) - len(times),
        peak_rss_mb=round(peak_kb / 1024, 1),
    )


@dataclass
class Round:
    round: int
    first: str  # which drain went first
    accepted: int
    load_failures: dict[str, int]
    relay: Drain
    baseline: Drain

    @property
    def ratio(self) -> float:
        return round(self.relay.rate / self.baseline.rate, 2)

    def text(self) -> str:
        parts = [
            f"{name} {d.rate:.0f}/s (order violations {d.order_violations}, "
            f"duplicates {d.duplicates}, lost {d.lost})"
            for name, d in (("relay", self.relay), ("baseline", self.baseline))
        ]
        return (
            f"round {self.round}: {self.accepted} accepted ({sum(self.load_failures.values())} "
            f"failed), {self.first} first | {' | '.join(parts)} | ratio {self.ratio:.2f} | "
            f"worker peak RSS {self.relay.peak_rss_mb:.0f} MB"
        )


def summary(rounds: list[Round]) -> dict[str, float]:
    relay, baseline = [r.relay for r in rounds], [r.baseline for r in rounds]
    return {
        "relay delivered/s (median)": round(statistics.median(d.rate for d in relay), 1),
        "baseline delivered/s (median)": round(statistics.median(d.rate for d in baseline), 1),
        "ratio relay/baseline (median)": round(statistics.median(r.ratio for r in rounds), 2),
        "relay order violations (sum)": sum(d.order_violations for d in relay),
        "baseline order violations (sum)": sum(d.order_violations for d in baseline),
        "relay duplicates (sum)": sum(d.duplicates for d in relay),
        "baseline duplicates (sum)": sum(d.duplicates for d in baseline),
        "relay lost (sum)": sum(d.lost for d in relay),
        "baseline lost (sum)": sum(d.lost for d in baseline),
        "load failures (sum)": sum(sum(r.load_failures.values()) for r in rounds),
        "worker peak RSS MB (max)": max(d.peak_rss_mb for d in relay),
    }


async def delete_broker_objects(queues: list[str], exchanges: list[str]) -> None:
    try:
        async with asyncio.timeout(CLEANUP_SECONDS):
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                for name in [*queues, *exchanges]:
                    assert name not in PROTECTED
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):  # never declared
                        channel = await connection.channel()  # a failed delete closes it
                        delete = channel.queue_delete if name in queues else channel.exchange_delete
                        await delete(name)
                        await channel.close()
    except (aio_pika.exceptions.AMQPError, OSError, TimeoutError) as exc:
        print(f"warning: cleanup failed ({exc!r}): {queues + exchanges}", file=sys.stderr)


async def run(args: argparse.Namespace, directory: Path) -> list[Round]:
    tag = uuid.uuid4().hex[:8]
    exchange, handler = f"relay.bench-drain-{tag}", f"drain{tag}"
    baseline = f"relay.bench-baseline-{tag}"
    port, endpoint = free_port(), f"http://127.0.0.1:{free_port()}"
    config = directory / "relay.toml"
    options = {"concurrency": args.concurrency, "window": args.window}
    config.write_text(
        CONFIG.format(
            exchange=exchange, port=port, path=SOURCE_PATH, secret=SECRET, handler=handler,
            url=endpoint + "/hook", partitions=args.partitions,
        ) + "".join(f"{k} = {v}\n" for k, v in options.items() if v is not None),
        encoding="utf-8",
    )  # fmt: skip
    source = load_config(config).sources[0]

    def relay(command: str) -> tuple[str, ...]:
        return ("-m", "relay", *command.split(), "--config", str(config), "--log-level", "warning")

    consumers = {
        "relay": relay("worker"),
        "baseline": ("-c", BASELINE, AMQP_URL, baseline, endpoint + "/hook"),
    }
    drain_seconds = 60 + args.count * (args.latency_ms / 1000 + 0.005) / 8
    children: list[Child] = []
    rounds: list[Round] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(REQUEST_SECONDS)) as session:
            declare = await Child.start("topology", directory / "topology.log",
                                        *relay("topology declare"))  # fmt: skip
            children.append(declare)
            if await asyncio.wait_for(declare.process.wait(), STARTUP_SECONDS) != 0:
                raise BenchError(f"relay topology declare failed:\n{declare.log_tail()}")
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                queue = await (await connection.channel()).declare_queue(
                    baseline, durable=True, arguments={"x-queue-type": "quorum"}
                )
                await queue.bind(exchange, routing_key="envoice.#")
            ingress = await Child.start("ingress", directory / "ingress.log", *relay("ingress"))
            hook = await Child.start("endpoint", directory / "endpoint.log", "-c", ENDPOINT,
                                     endpoint.rsplit(":", 1)[1], str(args.latency_ms))  # fmt: skip
            children += [ingress, hook]
            await wait_ok(session, f"http://127.0.0.1:{port}/readyz", ingress)
            await wait_ok(session, endpoint + "/recorded", hook)
            for n in range(args.rounds):
                invoices = range(n * args.keys + 1, (n + 1) * args.keys + 1)  # new keys each round
                url = f"http://127.0.0.1:{port}{SOURCE_PATH}"
                accepted, failures = await load(session, url, source, args.count, invoices)
                ingress.check_alive()
                order = ["relay", "baseline"] if n % 2 == 0 else ["baseline", "relay"]
                drains: dict[str, Drain] = {}
                for name in order:
                    async with session.post(endpoint + "/clear") as response:
                        response.raise_for_status()
                    log = directory / f"{name}-{n + 1}.log"
                    consumer = await Child.start(name, log, *consumers[name])
                    drains[name] = await drain(session, endpoint, consumer, accepted, drain_seconds)
                    hook.check_alive()
                total = sum(len(ids) for ids in accepted.values())
                rounds.append(Round(n + 1, order[0], total, dict(failures), **drains))
                if not args.json:
                    print(rounds[-1].text(), flush=True)
    finally:
        for child in reversed(children):
            await child.stop()
        queues = [baseline, *(f"relay.{handler}.{i}" for i in range(args.partitions))]
        await delete_broker_objects(
            [*queues, f"relay.{handler}.dlq", f"relay.{handler}.outcomes"],
            [f"relay.{handler}", exchange],
        )
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.drain", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=10000, help="webhooks per round (10000)")
    parser.add_argument("--keys", type=int, default=200, help="invoices per round (200)")
    parser.add_argument("--latency-ms", type=float, default=20, help="endpoint latency (20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--partitions", type=int, default=4, help="handler partitions (4)")
    parser.add_argument("--concurrency", type=int, help="handler concurrency (relay's default)")
    parser.add_argument("--window", type=int, help="handler window (relay's default)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if min(args.count, args.keys, args.rounds, args.partitions) < 1 or args.latency_ms < 0:
        parser.error("--count, --keys, --rounds, --partitions must be >= 1, --latency-ms >= 0")
    keys = ("count", "keys", "latency_ms", "partitions", "concurrency", "window", "rounds")
    parameters = {k: getattr(args, k) for k in keys}
    if not args.json:
        shown = ", ".join(f"{k} {v:g}" for k, v in parameters.items() if v is not None)
        print(f"relay worker vs aio-pika baseline: {shown.replace('_ms', ' (ms)')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="relay-bench-drain-") as directory:
        try:
            rounds = asyncio.run(run(args, Path(directory)))
        except (BenchError, TimeoutError) as exc:
            print(f"drain bench: {exc or repr(exc)}", file=sys.stderr)
            return 1
    result = summary(rounds)
    if args.json:
        done = [{**asdict(r), "ratio": r.ratio} for r in rounds]
        dump = {"parameters": parameters, "rounds": done, "summary": result}
        print(json.dumps(dump, indent=2))
    else:
        for label, value in result.items():
            print(f"  {label:<34}{value:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
