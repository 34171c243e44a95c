"""Overload: one `relay ingress` process open-loop at 2x and 4x its capacity, shedding on
(`max_accept_queue` and `max_in_flight` bounded) and off (both huge: only `max_connections` bounds
the line, as before load shedding). Writes its table to docs/PERFORMANCE.md, "Overload".

1. Capacity C: wrk closed-loop (--connections, every request a new signed Envoice webhook)
   against the ingress, median of --rounds runs of --seconds.
2. Per round, each a fresh ingress: unloaded (open-loop at C/4, shedding on), then 2x and 4x C,
   shedding on and off (the order alternates per round), open-loop by tests/bench/openloop.py:
   requests on a fixed schedule whatever the answers. For each: p50/p99 of the 200s (from the
   scheduled send time), accepted/s, shed/s (requests_total{status="shed"}), other answers, the
   ingress's RSS after /readyz, at the end and at its peak, the accept queue (read every 0.2 s),
   and the messages stored in the queue against the 200s (every 200 stored: stored >= 200s; more
   only if a client gave up on an answer).

The sender cannot reach 4x of an ingress with a whole core on 2 shared cores, so the ingress runs
in a cgroup (v1 cpu controller, root needed) limited to --cpu of one core (0.25 by default); C is
that process's capacity. The ingress and the sender run at nice -10 and the cgroup has 10x the
default cpu.shares, ahead of other loads on a shared machine. max_in_flight follows the rule
docs/PERFORMANCE.md states for its default (C x 40 ms of work); max_accept_queue is C x 2 ms, the
tightest bound docs/PERFORMANCE.md recommends for a process of known capacity.

    python -m tests.bench.overload                  # 3 rounds of 10 s; writes docs/PERFORMANCE.md
    python -m tests.bench.overload --rounds 1 --seconds 5 --no-write

Needs wrk and RabbitMQ on $RELAY_AMQP_URL; loopback only; deletes the exchange and queue it
declared and the cgroup it made. Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractQueue
from prometheus_client.parser import text_string_to_metric_families

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
from tests.bench.ingress import PATH, POST_LUA, SECRET, declare_topology, run_wrk, write_bodies

WORK_SECONDS = 0.040  # the bound: this much work at capacity (docs/PERFORMANCE.md, "Overload")
QUEUE_SECONDS = 0.002  # the accept queue's bound: this much accepting at capacity (ditto)
UNLOADED = 0.25  # of capacity
LEVELS = (2, 4)  # times capacity
HUGE = 1_000_000  # the bound "off"

PRIORITY = -10  # nice of the ingress and the sender: ahead of other engineers' loads
SHARES = 10 * 1024  # the ingress cgroup's cpu.shares (1024 the default)
SENDER_GRACE_SECONDS = 60.0
SAMPLE_SECONDS = 0.2  # how often the accept queue is read
CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 10_000
START, END = "<!-- tests/bench/overload.py writes from here -->", "<!-- to here (overload) -->"


@contextlib.contextmanager
def cpu_limited(share: float) -> Iterator[Path | None]:
    """A cgroup (v1 cpu) allowing `share` of one core; removed afterwards. None if share is 0."""
    if not share:
        yield None
        return
    group = CGROUP_ROOT / f"relay-bench-overload-{os.getpid()}"
    try:
        group.mkdir()
        # a 10 ms period: the process runs a little every 10 ms, not in 100 ms bursts
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(int(share * PERIOD_US)))
        (group / "cpu.shares").write_text(str(SHARES))
    except OSError as exc:
        raise SystemExit(f"cannot make a cpu cgroup ({exc}): run as root, or --cpu 0") from None
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()  # empty once its processes have exited


async def start_ingress(
    config: Path, directory: Path, admin_port: int, group: Path | None, name: str
) -> Child:
    child = await Child.start(name, directory / f"{name}.log", "-m", "relay", "ingress",
                              "--config", str(config), "--log-level", "warning")  # fmt: skip
    if group is not None:
        (group / "cgroup.procs").write_text(str(child.process.pid))
    prioritise(child.process.pid)
    async with aiohttp.ClientSession() as session:
        await wait_ok(session, f"http://127.0.0.1:{admin_port}/readyz", child)
    return child


def prioritise(pid: int) -> None:
    """Ahead of other loads on the shared machine (root needed; else as it is)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, PRIORITY)


async def shed_totals(admin_port: int) -> tuple[float, float]:
    """The requests shed: as their connection was accepted (no source: the accept queue, or the
    publish bound while shedding), and after their request was read (the publish bound)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
    ):
        text = await response.text()
    at_accept = at_request = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "relay_ingress_requests_total" and sample.labels["status"] == "shed":
                if sample.labels["source"]:
                    at_request += sample.value
                else:
                    at_accept += sample.value
    return at_accept, at_request


async def queue_samples(admin_port: int, until: asyncio.Event) -> list[float]:
    """relay_ingress_accept_queue (as last read) every SAMPLE_SECONDS until `until` is set."""
    samples = []
    async with aiohttp.ClientSession() as session:
        while not until.is_set():
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
                    text = await response.text()
                samples += [
                    sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "relay_ingress_accept_queue"
                ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), SAMPLE_SECONDS)
    return samples


async def stored(queue: AbstractQueue) -> int:
    declared = await queue.channel.declare_queue(queue.name, passive=True)
    return declared.declaration_result.message_count or 0


async def capacity(
    config: Path, directory: Path, port: int, group: Path | None, args: argparse.Namespace
) -> list[float]:
    lua, bodies = directory / "post.lua", directory / "bodies"
    lua.write_text(POST_LUA)
    rates = []
    for round_ in range(args.rounds):
        # more than the ingress answers in a run (so no body is sent twice), few to sign
        write_bodies(config, bodies, int(20_000 * (args.cpu or 1) * args.seconds))
        child = await start_ingress(config, directory, args.admin_port, group, f"capacity-{round_}")
        try:
            result = await run_wrk(
                f"http://127.0.0.1:{port}{PATH}", bodies, lua, args.seconds, args.connections
            )
        finally:
            await child.stop()
        rates.append(result["accepted"] / args.seconds)
        print(f"  capacity round {round_ + 1}: {rates[-1]:,.0f} accepted/s (wrk closed-loop, "
              f"{args.connections} connections, p99 {result['p99_ms']:.1f} ms)",
              flush=True)  # fmt: skip
    return rates


async def open_loop(
    config: Path,
    directory: Path,
    port: int,
    group: Path | None,
    queue: AbstractQueue,
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    bodies = directory / "open-bodies"
    write_bodies(config, bodies, int(rate * args.seconds) + 1)
    child = await start_ingress(config, directory, args.admin_port, group, f"open-{rate:.0f}")
    try:
        rss_start = memory_kb(child.process.pid, "VmRSS") / 1024
        argv = (sys.executable, "-m", "tests.bench.openloop", "--port", str(port),
                "--path", PATH, "--bodies", str(bodies), "--rate", str(rate),
                "--seconds", str(args.seconds))  # fmt: skip
        sender = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=subprocess.PIPE)
        prioritise(sender.pid)
        done = asyncio.Event()
        sampling = asyncio.ensure_future(queue_samples(args.admin_port, done))
        try:
            output, _ = await asyncio.wait_for(
                sender.communicate(), args.seconds + SENDER_GRACE_SECONDS
            )
        finally:
            done.set()
            queues = await sampling
        child.check_alive()
        rss_end = memory_kb(child.process.pid, "VmRSS") / 1024
        rss_peak = memory_kb(child.process.pid, "VmHWM") / 1024
        at_accept, at_request = await shed_totals(args.admin_port)
    finally:
        await child.stop()
    result: dict[str, Any] = orjson.loads(output.splitlines()[-1])
    result |= {"rss_start": rss_start, "rss_end": rss_end, "rss_peak": rss_peak}
    result |= {"shed": at_accept + at_request, "shed_at_request": at_request}
    result["queue_p50"] = statistics.median(queues) if queues else float("nan")
    result["queue_max"] = max(queues, default=float("nan"))
    result["stored"] = await stored(queue)
    await queue.purge()
    return result


def line(label: str, r: dict[str, Any], seconds: float) -> str:
    answers = r["answers"]
    other = {k: v for k, v in answers.items() if k != "accepted"}
    return (
        f"  {label}: sent {r['sent']:,}, accepted {answers.get('accepted', 0) / seconds:,.0f}/s, "
        f"shed {r['shed'] / seconds:,.0f}/s ({r['shed_at_request'] / seconds:,.0f}/s after "
        f"reading the request), p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
        f"RSS {r['rss_start']:.0f} -> {r['rss_end']:.0f} MB (peak {r['rss_peak']:.0f}), "
        f"stored {r['stored']:,} of {answers.get('accepted', 0):,} 200s, other {other}, "
        f"unanswered {r['unanswered']}, sender late {r['max_late_ms']:.0f} ms, accept queue "
        f"p50 {r['queue_p50']:.0f}, max {r['queue_max']:.0f}"
    )


async def run(args: argparse.Namespace, directory: Path, group: Path | None) -> str:
    port, exchange = free_port(), f"relay.benchmark-{uuid.uuid4().hex[:8]}"
    args.admin_port = free_port()  # /metrics apart: while shedding, the webhook port refuses
    base = SOURCE_CONFIG.format(exchange=exchange, port=port, path=PATH, secret=SECRET).replace(
        "[ingress]\n", f"[ingress]\nadmin_port = {args.admin_port}\n"
    )
    off = directory / "off.toml"
    off.write_text(base.replace(
        "[ingress]\n", f"[ingress]\nmax_in_flight = {HUGE}\nmax_accept_queue = {HUGE}\n"
    ))  # fmt: skip
    await declare_topology(off)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            exchange, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, "#")
        print("capacity", flush=True)
        rates = await capacity(off, directory, port, group, args)
        await queue.purge()
        c = statistics.median(rates)
        bound = args.max_in_flight or max(1, round(c * WORK_SECONDS))
        args.max_accept_queue = args.max_accept_queue or max(1, round(c * QUEUE_SECONDS))
        on = directory / "on.toml"
        on.write_text(base.replace(
            "[ingress]\n",
            f"[ingress]\nmax_in_flight = {bound}\nmax_accept_queue = {args.max_accept_queue}\n",
        ))  # fmt: skip
        print(f"C = {c:,.0f} accepted/s; max_in_flight = {bound}, max_accept_queue = "
              f"{args.max_accept_queue}", flush=True)  # fmt: skip
        results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            runs = [("unloaded", on, UNLOADED)]
            modes = [("on", on), ("off", off)]
            for level in LEVELS:
                for mode, config in modes if round_ % 2 == 0 else modes[::-1]:
                    runs.append((f"{level}x, shedding {mode}", config, level))
            for label, config, times in runs:
                result = await open_loop(config, directory, port, group, queue, times * c, args)
                results[label].append(result)
                print(line(label, result, args.seconds), flush=True)
    finally:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            await channel.queue_delete(exchange)
            await channel.exchange_delete(exchange)
        await connection.close()
    return report(rates, c, bound, results, args)


def report(
    rates: list[float],
    c: float,
    bound: int,
    results: dict[str, list[dict[str, Any]]],
    args: argparse.Namespace,
) -> str:
    def med(label: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[label])

    unloaded_p99 = med("unloaded", "p99_ms")
    rows = []
    for label, runs in results.items():
        accepted = statistics.median(r["answers"].get("accepted", 0) for r in runs)
        lost = sum(max(0, r["answers"].get("accepted", 0) - r["stored"]) for r in runs)
        other = sum(
            sum(v for k, v in r["answers"].items() if k not in ("accepted", "503"))
            + r["unanswered"]
            for r in runs
        )
        p99 = med(label, "p99_ms")
        rows.append(
            f"| {label} | {med(label, 'sent') / args.seconds:,.0f} | {accepted / args.seconds:,.0f}"
            f" | {med(label, 'shed') / args.seconds:,.0f} "
            f"({med(label, 'shed_at_request') / args.seconds:,.0f}) | {med(label, 'p50_ms'):.1f} | "
            f"{p99:.1f} | {p99 / unloaded_p99:.1f}x | {med(label, 'queue_p50'):.0f} "
            f"({max(r['queue_max'] for r in runs):.0f}) | {med(label, 'rss_start'):.0f} -> "
            f"{med(label, 'rss_end'):.0f} ({max(r['rss_peak'] for r in runs):.0f}) | "
            f"{sum(r['stored'] for r in runs):,} / "
            f"{sum(r['answers'].get('accepted', 0) for r in runs):,} | {lost} | {other} |"
        )
    cpu = "unlimited"
    if args.cpu:
        cpu = f"limited to {args.cpu:g} of a core (cgroup cpu quota, 10 ms period)"
    return "\n".join([
        f"Measured {datetime.now(UTC):%Y-%m-%d} by `python -m tests.bench.overload --rounds "
        f"{args.rounds} --seconds {args.seconds:g} --cpu {args.cpu:g}` on {os.cpu_count()} "
        f"shared cores: one `relay ingress` process, its CPU {cpu}; RabbitMQ on loopback, one "
        f"quorum queue. Capacity C = {c:,.0f} accepted/s (wrk closed-loop, {args.connections} "
        f"connections; rounds {', '.join(f'{r:,.0f}' for r in rates)}); max_in_flight = {bound} "
        f"(C x {WORK_SECONDS * 1000:g} ms, unless given) and max_accept_queue = "
        f"{args.max_accept_queue} (C x {QUEUE_SECONDS * 1000:g} ms, unless given) when "
        f"shedding is on, both {HUGE:,} when off; ingress and sender at nice {PRIORITY}, the "
        f"cgroup's cpu.shares {SHARES}. Open-loop "
        f"(tests/bench/openloop.py), {args.seconds:g} s per run, a fresh ingress each; medians "
        f"of {args.rounds} rounds; latency of the 200s from each request's scheduled time.",
        "",
        "| load | sent/s | accepted/s | shed/s (of which after reading the request) | p50 ms | "
        "p99 ms | p99 vs unloaded | accept queue p50 (max) | RSS MB start -> end (peak) | "
        "stored / 200s, all rounds | 200s not stored | no answer, dropped or other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"  # fmt: skip


def write_performance(table: str) -> None:
    path = ROOT / "docs" / "PERFORMANCE.md"
    head, found, rest = path.read_text(encoding="utf-8").partition(START)
    if not found:
        raise BenchError(f"docs/PERFORMANCE.md has no {START}")
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{table}{END}{tail}", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50, help="of wrk, for C")
    parser.add_argument("--cpu", type=float, default=0.25, help="of a core; 0: no limit")
    parser.add_argument("--max-in-flight", type=int, default=0, help="0: C x 40 ms")
    parser.add_argument("--max-accept-queue", type=int, default=0, help="0: C x 2 ms")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="relay-overload-") as directory,
        cpu_limited(args.cpu) as group,
    ):
        try:
            text = asyncio.run(run(args, Path(directory), group))
        except (BenchError, TimeoutError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    print(text)
    if not args.no_write:
        write_performance(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
