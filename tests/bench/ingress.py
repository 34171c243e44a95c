"""Ingress throughput against its baselines, in one run: writes docs/PERFORMANCE.md.

Each round runs every server in turn (the order rotates per round) under wrk with --connections
connections for --seconds, every request a new signed Envoice webhook (no duplicates: each run
posts bodies with ids never sent before, since ingress processes remember what any of them
accepted, through relay.ids), confirmed persistent publishes to one quorum queue bound to the
exchange:

- relay: `relay ingress` (uvloop), and `relay ingress --processes 2`, with the archive on (the
  default: every webhook also lands in the stream relay.archive); with --archive-off also
  `relay ingress` with `[archive] enabled = false`, on an exchange of its own bound to the same
  queue, for the archive's cost;
- with --baseline CHECKOUT, `relay ingress` run from another checkout of relay (a git worktree of
  the commit before a change): before and after, in the same rounds;
- plain: tests/bench/plain.py, the plain relay a user writes (aiohttp, HMAC, orjson, aio-pika
  publish with confirm), on asyncio and on uvloop;
- ceiling: tests/bench/ceiling.py, an aiohttp handler that only reads the body (no broker);
- broker: tests/bench/broker.py, raw aio-pika confirmed publishes, 500 in flight (no HTTP).

Then `relay bench` holds 1,000 req/s against `relay ingress` for the latency percentiles, and
with --outage S holds 500 req/s through an S-second broker outage (`rabbitmqctl stop_app`, then
`start_app`; restored whatever happens) for the answers' latency and the ingress's memory.
Medians over the rounds, ratios against the plain relay measured in the same run. From the repo
root:

    python -m tests.bench.ingress --outage 60    # 3 rounds of 10 s; writes docs/PERFORMANCE.md
    python -m tests.bench.ingress --rounds 1 --seconds 5 --no-write

The table goes between the markers in docs/PERFORMANCE.md; the rest of that file is prose.

Needs wrk (apt-get install wrk) and RabbitMQ on $RELAY_AMQP_URL; talks only to 127.0.0.1.
Deletes the exchange and queue it declared. Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from relay.config import load as load_config
from relay.providers import PROVIDERS
from tests.bench.common import (
    AMQP_URL,
    ROOT,
    SOURCE_CONFIG,
    BenchError,
    Child,
    free_port,
    memory_kb,
    wait_ok,
)
from tests.processes import Broker

SECRET = "bench-secret"
PATH = "/webhooks/envoice"
MAX_RATE = 15_000  # bodies per second of a run: more than any server here answers
RUN_GRACE_SECONDS = 30.0  # beyond --seconds, for wrk to finish
HELD_RATE = 1000
BASELINE = "relay ingress, baseline"
OUTAGE_RATE = 500
OUTAGE_AFTER_SECONDS = 10.0  # of held load before the broker stops, and after it is back
OUTAGE_MARGIN_SECONDS = 20.0  # for rabbitmqctl stop_app and start_app themselves
START, END = "<!-- tests/bench/ingress.py writes from here -->", "<!-- to here -->"

# wrk: POST the bodies file's lines in turn, count answers that say "accepted".
POST_LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  bodies, i, accepted, other = {}, 0, 0, 0
  for line in io.lines(args[1]) do table.insert(bodies, line) end
  wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json"
end
function request()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
function response(status, headers, body)
  if status == 200 and body:find('"accepted"', 1, true) then accepted = accepted + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  local a, o = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("accepted"); o = o + t:get("other") end
  io.write(string.format("ACCEPTED %d OTHER %d P50_MS %.2f P99_MS %.2f\\n", a, o,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


@dataclass
class Server:
    name: str
    argv: tuple[str, ...]
    runs: list[float] = field(default_factory=list)  # accepted/s
    p99_ms: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    cpu_ms_per_request: list[float] = field(default_factory=list)
    broker_ms_per_request: list[float] = field(default_factory=list)  # RabbitMQ's CPU
    wrk_ms_per_request: list[float] = field(default_factory=list)


def servers(config: Path, port: int, exchange: str) -> list[Server]:
    relay = ("-m", "relay", "ingress", "--config", str(config), "--log-level", "warning")
    plain = ("-m", "tests.bench.plain", "--port", str(port), "--exchange", exchange)
    return [
        Server("relay ingress", relay),
        Server("relay ingress --processes 2", (*relay, "--processes", "2")),
        Server("plain relay, asyncio", plain),
        Server("plain relay, uvloop", (*plain, "--uvloop")),
        Server(
            "HTTP ceiling (read body, no broker)",
            ("-m", "tests.bench.ceiling", "--port", str(port)),
        ),
    ]


async def declare_topology(config: Path) -> None:
    declare = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "topology", "declare", "--config", str(config),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, errors = await asyncio.wait_for(declare.communicate(), RUN_GRACE_SECONDS)
    if declare.returncode:
        raise BenchError(f"relay topology declare: {errors.decode()}")


def write_bodies(config: Path, path: Path, count: int) -> None:
    source = load_config(config).sources[0]
    sample, first = PROVIDERS["envoice"].sample, time.time_ns() // 1000
    with path.open("wb") as out:
        for i in range(count):
            out.write(
                sample(source, event_id=first + i, key=i % 1000, now=time.time()).body + b"\n"
            )


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (and their reaped children)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def _children_cpu() -> float:
    """User + system CPU seconds of this process's children that have exited."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def broker_pids() -> list[int]:
    """The local RabbitMQ node's OS process, to count its CPU; none if rabbitmqctl cannot say."""
    try:
        said = subprocess.run(["rabbitmqctl", "eval", "os:getpid()."], capture_output=True,
                              text=True, timeout=RUN_GRACE_SECONDS, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(pid) for pid in re.findall(r"\d+", said)[:1]]


def family(pid: int) -> list[int]:
    """`pid` and its child processes (relay ingress --processes N forks N)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [pid, *(int(c) for c in children.read_text().split())]
    except OSError:
        return [pid]


async def run_wrk(
    url: str, bodies: Path, lua: Path, seconds: float, connections: int
) -> dict[str, float]:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "-s",
        str(lua),
        url,
        "--",
        str(bodies),
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), seconds + RUN_GRACE_SECONDS)
    match = re.search(rb"ACCEPTED (\d+) OTHER (\d+) P50_MS ([\d.]+) P99_MS ([\d.]+)", output)
    if match is None:
        raise BenchError(f"wrk said:\n{output.decode(errors='replace')}")
    accepted, other, p50, p99 = (float(x) for x in match.groups())
    return {"accepted": accepted, "other": other, "p50_ms": p50, "p99_ms": p99}


async def measure(
    server: Server, directory: Path, port: int, bodies: Path, lua: Path, args: argparse.Namespace
) -> None:
    log = directory / f"{server.name.split(',')[0].replace(' ', '-')}.log"
    child = await Child.start(server.name, log, *server.argv)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ok(session, f"http://127.0.0.1:{port}/readyz", child)
        pids = family(child.process.pid)
        cpu_before, broker_before = cpu_seconds(pids), cpu_seconds(args.broker_pids)
        wrk_before = _children_cpu()
        result = await run_wrk(
            f"http://127.0.0.1:{port}{PATH}", bodies, lua, args.seconds, args.connections
        )
        cpu = cpu_seconds(pids) - cpu_before
        broker_cpu = cpu_seconds(args.broker_pids) - broker_before
        wrk_cpu = _children_cpu() - wrk_before  # wrk is the only child that exits meanwhile
        peak = sum(memory_kb(pid, "VmHWM") for pid in pids) / 1024
    finally:
        await child.stop()
    rate = result["accepted"] / args.seconds
    server.runs.append(rate)
    server.p99_ms.append(result["p99_ms"])
    server.peak_rss_mb.append(peak)
    answered = max(result["accepted"], 1)
    server.cpu_ms_per_request.append(1000 * cpu / answered)
    server.broker_ms_per_request.append(1000 * broker_cpu / answered)
    server.wrk_ms_per_request.append(1000 * wrk_cpu / answered)
    refused = f", {result['other']:.0f} not accepted" if result["other"] else ""
    print(f"  {server.name}: {rate:,.0f} accepted/s, p99 {result['p99_ms']:.1f} ms, "
          f"peak RSS {peak:.0f} MB{refused}", flush=True)  # fmt: skip


async def broker_ceiling(exchange: str, seconds: float) -> float:
    argv = (
        sys.executable,
        "-m",
        "tests.bench.broker",
        "--exchange",
        exchange,
        "--seconds",
        str(seconds),
    )
    process = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=subprocess.PIPE)
    output, _ = await asyncio.wait_for(process.communicate(), seconds + RUN_GRACE_SECONDS)
    match = re.search(rb"CONFIRMED_PER_SECOND (\d+)", output)
    if match is None:
        raise BenchError(f"broker bench said: {output.decode(errors='replace')}")
    rate = float(match.group(1))
    print(f"  broker ceiling (aio-pika, 500 in flight): {rate:,.0f} confirmed/s", flush=True)
    return rate


async def held_rate(
    config: Path, directory: Path, port: int, rate: int, seconds: float, outage: float = 0
) -> dict[str, Any]:
    """`relay bench --rate RATE` against a fresh `relay ingress` for `seconds`; with `outage`,
    the broker stops OUTAGE_AFTER_SECONDS in, for `outage` seconds. The report, with the
    ingress's peak RSS."""
    log = directory / f"held-{rate}.log"
    child = await Child.start("relay ingress", log, "-m", "relay", "ingress", "--config",
                              str(config), "--log-level", "warning")  # fmt: skip
    broker = Broker()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ok(session, f"http://127.0.0.1:{port}/readyz", child)
        argv = (sys.executable, "-m", "relay", "bench", "--config", str(config), "--rate",
                str(rate), "--duration", str(seconds), "--json", "--quiet")  # fmt: skip
        process = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=subprocess.PIPE)
        recovered = math.nan
        if outage:
            await asyncio.sleep(OUTAGE_AFTER_SECONDS)  # the scenario's timeline, not a sync
            await broker.stop()
            await asyncio.sleep(outage)
            await broker.start()
            back = time.monotonic()
            async with aiohttp.ClientSession() as session:
                await wait_ok(session, f"http://127.0.0.1:{port}/readyz", child)
            recovered = time.monotonic() - back
        output, _ = await asyncio.wait_for(process.communicate(), seconds + RUN_GRACE_SECONDS)
        peak = memory_kb(child.process.pid, "VmHWM") / 1024
    finally:
        await broker.restore()
        await child.stop()
    report: dict[str, Any] = orjson.loads(output.splitlines()[-1])
    report["peak_rss_mb"] = peak
    report["recovered_seconds"] = recovered
    print(f"  held {rate}/s{f' through a {outage:g} s outage' if outage else ''}: "
          f"p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms, max "
          f"{report['max_ms']:.1f} ms, peak RSS {peak:.0f} MB, answers {report['answers']}",
          flush=True)  # fmt: skip
    return report


async def run(args: argparse.Namespace, directory: Path) -> str:
    port, exchange = free_port(), f"relay.benchmark-{uuid.uuid4().hex[:8]}"
    config = directory / "bench.toml"
    config.write_text(SOURCE_CONFIG.format(exchange=exchange, port=port, path=PATH, secret=SECRET))
    lua, bodies = directory / "post.lua", directory / "bodies"
    lua.write_text(POST_LUA)
    await declare_topology(config)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    queue = await channel.declare_queue(
        exchange, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(exchange, "#")
    every = servers(config, port, exchange)
    if args.archive_off:  # the same ingress on an exchange the archive is not bound to
        off = directory / "bench-archive-off.toml"
        off.write_text(
            SOURCE_CONFIG.format(exchange=f"{exchange}-off", port=port, path=PATH, secret=SECRET)
            + "[archive]\nenabled = false\n"
        )
        await declare_topology(off)
        await queue.bind(f"{exchange}-off", "#")
        argv = ("-m", "relay", "ingress", "--config", str(off), "--log-level", "warning")
        every.insert(1, Server("relay ingress, archive off", argv))
    if args.baseline:  # another checkout's `relay ingress`, same config: before vs after
        run_from = (
            f"import runpy, sys; sys.path.insert(0, {str(args.baseline.resolve())!r}); "
            "sys.argv[0] = 'relay'; runpy.run_module('relay', run_name='__main__')"
        )
        argv = ("-c", run_from, "ingress", "--config", str(config), "--log-level", "warning")
        every.insert(1, Server(BASELINE, argv))
    chosen = [s for s in every if not args.only or s.name in args.only or s.name == BASELINE]
    brokers: list[float] = []
    held: dict[str, Any] = {}
    outage: dict[str, Any] = {}
    try:
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            turn = chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]
            for server in turn:
                write_bodies(config, bodies, int(MAX_RATE * args.seconds))
                await measure(server, directory, port, bodies, lua, args)
                await queue.purge()
            if not args.only:
                brokers.append(await broker_ceiling(exchange, args.seconds))
                await queue.purge()
        await connection.close()  # before an outage closes it
        if not args.only:
            held = await held_rate(config, directory, port, HELD_RATE, args.seconds)
        if args.outage:
            # rabbitmqctl takes seconds to stop and start the app: the load goes on beyond
            duration = args.outage + 2 * OUTAGE_AFTER_SECONDS + OUTAGE_MARGIN_SECONDS
            outage = await held_rate(config, directory, port, OUTAGE_RATE, duration, args.outage)
    finally:
        await connection.close()
        async with await aio_pika.connect(AMQP_URL) as cleanup:
            channel = await cleanup.channel()
            await channel.queue_delete(exchange)
            await channel.exchange_delete(exchange)
            await channel.exchange_delete(f"{exchange}-off")
    return report(chosen, brokers, held, outage, args)


def report(
    chosen: list[Server],
    brokers: list[float],
    held: dict[str, Any],
    outage: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    median = {s.name: statistics.median(s.runs) for s in chosen}
    base = median.get("plain relay, asyncio")
    rows = []
    for s in chosen:
        ratio = f"{median[s.name] / base:.2f}x" if base else "-"
        runs = ", ".join(f"{r:,.0f}" for r in s.runs)
        p99, cpu = statistics.median(s.p99_ms), statistics.median(s.cpu_ms_per_request)
        broker = statistics.median(s.broker_ms_per_request)
        wrk = statistics.median(s.wrk_ms_per_request)
        rows.append(f"| {s.name} | {median[s.name]:,.0f} | {ratio} | {p99:.1f} | {cpu:.3f} | "
                    f"{broker:.3f} | {wrk:.3f} | {max(s.peak_rss_mb):.0f} | {runs} |")  # fmt: skip
    if brokers:
        rows.append(f"| broker ceiling: aio-pika confirmed publishes, 500 in flight, no HTTP | "
                    f"{statistics.median(brokers):,.0f} | - | - | - | - | - | - | "
                    f"{', '.join(f'{b:,.0f}' for b in brokers)} |")  # fmt: skip
    model = platform.processor() or _cpu_model()
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d} by `python -m tests.bench.ingress --rounds "
        f"{args.rounds} --seconds {args.seconds:g} --connections {args.connections}"
        f"{f' --outage {args.outage:g}' if args.outage else ''}"
        f"{' --broker-core' if args.broker_core else ''}` on {os.cpu_count()} cores "
        f"({model}), Python {platform.python_version()}, RabbitMQ on loopback"
        f"{' pinned to a core of its own' if args.broker_core else ''}, wrk -t1 "
        f"-c{args.connections} on the same machine. Every request is a new signed Envoice webhook "
        "(no duplicates), published persistent with a confirm to one quorum queue. Medians of the "
        "rounds; the ratio is against the plain relay on asyncio in the same run. This machine is "
        "shared and noisy: compare within the table, not across runs.",
        "",
        "| server | accepted/s | vs plain asyncio | p99 ms | CPU ms/request: server | RabbitMQ "
        "| wrk | peak RSS MB | runs |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if held:
        lines += [
            "",
            f"`relay bench --rate {HELD_RATE}` against `relay ingress` for {args.seconds:g} s: "
            f"{held['accepted']:,.0f} accepted, p50 {held['p50_ms']:.1f} ms, p95 "
            f"{held['p95_ms']:.1f} ms, p99 {held['p99_ms']:.1f} ms, max {held['max_ms']:.1f} ms; "
            f"ingress peak RSS {held['peak_rss_mb']:.0f} MB.",
        ]
    if outage:
        answers = ", ".join(f"{n:,} {what}" for what, n in sorted(outage["answers"].items()))
        refused_seconds = outage["answers"].get("HTTP 503", 0) / OUTAGE_RATE
        lines += [
            "",
            f"`relay bench --rate {OUTAGE_RATE}` against `relay ingress` through a "
            f"{args.outage:g} s broker outage (`rabbitmqctl stop_app` {OUTAGE_AFTER_SECONDS:g} s "
            f"in, `start_app` "
            f"{args.outage:g} s later): answers {answers}; latency p99 {outage['p99_ms']:.1f} ms, "
            f"max {outage['max_ms']:.1f} ms; ingress peak RSS {outage['peak_rss_mb']:.0f} MB. "
            f"The 503s cover about {refused_seconds:.0f} s of requests (the outage and the "
            "broker's own stop and start); `/readyz` answered 200 again "
            f"{outage['recovered_seconds']:.1f} s after `start_app` returned (reconnect backoff "
            "up to 5 s).",
        ]
    return "\n".join(lines) + "\n"


def write_performance(table: str) -> None:
    """Put `table` between the markers of docs/PERFORMANCE.md, keeping the prose around them."""
    path = ROOT / "docs" / "PERFORMANCE.md"
    text = (
        path.read_text(encoding="utf-8") if path.exists() else f"# Performance\n\n{START}\n{END}\n"
    )
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{table}{END}{tail}", encoding="utf-8")


@contextlib.contextmanager
def broker_on_own_core(pids: list[int]) -> Iterator[None]:
    """The broker's threads on the last core, this process (and the children it starts) on the
    others; the broker's threads back on the cores they had, whatever happens."""
    if not pids or (os.cpu_count() or 1) < 2:
        raise SystemExit("--broker-core needs the local broker's pid and at least 2 cores")
    cores = sorted(os.sched_getaffinity(0))
    threads = [int(t.name) for pid in pids for t in Path(f"/proc/{pid}/task").iterdir()]
    found = {tid: os.sched_getaffinity(tid) for tid in threads}
    try:
        for tid in threads:
            os.sched_setaffinity(tid, cores[-1:])
        os.sched_setaffinity(0, cores[:-1])
        yield
    finally:
        for tid, had in found.items():
            with contextlib.suppress(OSError):  # a scheduler thread that has ended
                os.sched_setaffinity(tid, had)
        os.sched_setaffinity(0, cores)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--outage",
        type=float,
        default=0,
        metavar="S",
        help="also hold load through an S-second broker outage (stops the local broker)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this server "
        "(repeat for several); no broker ceiling, no held rate, nothing written",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the table, do not write docs/PERFORMANCE.md"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help=f"also run `relay ingress` from another checkout of relay (e.g. a git worktree of "
        f"the commit before a change), as {BASELINE!r}, in the same rounds",
    )
    parser.add_argument(
        "--broker-core",
        action="store_true",
        help="pin RabbitMQ to the last core and this bench (servers, wrk) to the others, as when "
        "the broker runs on its own machine; the broker's affinity is restored afterwards",
    )
    parser.add_argument(
        "--archive-off",
        action="store_true",
        help="also run `relay ingress` with [archive] enabled = false (its cost: the archive's)",
    )
    args = parser.parse_args()
    args.broker_pids = broker_pids()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 1
    with (
        tempfile.TemporaryDirectory(prefix="relay-bench-") as directory,
        contextlib.ExitStack() as pins,
    ):
        if args.broker_core:
            pins.enter_context(broker_on_own_core(args.broker_pids))
        try:
            text = asyncio.run(run(args, Path(directory)))
        except (BenchError, TimeoutError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    print(text)
    if not args.no_write and not args.only:
        write_performance(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
