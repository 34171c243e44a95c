"""An open-loop HTTP sender: POSTs the lines of a bodies file on a fixed schedule (`--rate` a
second for `--seconds`), whatever the answers, as providers do at a peak; wrk is closed-loop
(a slow server slows it down, hiding the queue). Prints one JSON line.

Latency is measured from each request's scheduled time, so a sender that falls behind counts
against the server rather than hiding it (coordinated omission). A request finds an idle
keep-alive connection or opens a new one (up to --max-connections; beyond, it is counted
`no_connection`, never queued). Used by tests/bench/overload.py; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import orjson

GRACE_SECONDS = 30.0  # after the schedule, for the answers still due
TICK_SECONDS = 0.001


class Sender:
    def __init__(self, host: str, port: int, path: str, max_connections: int) -> None:
        self.host, self.port, self.max_connections = host, port, max_connections
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.open = 0
        self.peak_open = 0
        self.answers: Counter[str] = Counter()
        self.accepted_ms: list[float] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, body: bytes, due: float) -> None:
        if not self.idle and self.open >= self.max_connections:
            self.answers["no_connection"] += 1
            return
        task = asyncio.ensure_future(self._post(body, due))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _post(self, body: bytes, due: float) -> None:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            self.open += 1
            self.peak_open = max(self.peak_open, self.open)
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.open -= 1
                self.answers["connect_error"] += 1
                return
        try:
            writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12].decode()
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            answer = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.open -= 1
            writer.close()
            self.answers["connection_lost"] += 1
            return
        elapsed_ms = (time.perf_counter() - due) * 1000
        if status == "200" and b'"accepted"' in answer:
            self.answers["accepted"] += 1
            self.accepted_ms.append(elapsed_ms)
        else:
            self.answers[status] += 1
        if close:
            self.open -= 1
            writer.close()
        else:
            self.idle.append((reader, writer))


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


async def run(args: argparse.Namespace, bodies: list[bytes]) -> dict[str, object]:
    total = int(args.rate * args.seconds)
    if total > len(bodies):
        raise SystemExit(f"{total} requests due, {len(bodies)} bodies")
    sender = Sender("127.0.0.1", args.port, args.path, args.max_connections)
    start = time.perf_counter()
    sent, late = 0, 0.0
    while sent < total:
        now = time.perf_counter()
        due_count = min(total, int((now - start) * args.rate) + 1)
        while sent < due_count:
            due = start + sent / args.rate
            late = max(late, now - due)
            sender.send(bodies[sent], due)
            sent += 1
        await asyncio.sleep(TICK_SECONDS)
    schedule_seconds = time.perf_counter() - start
    if sender.tasks:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*sender.tasks), GRACE_SECONDS)
    unanswered = len(sender.tasks)
    for _, writer in sender.idle:
        writer.close()
    ms = sender.accepted_ms
    return {
        "sent": sent,
        "answers": dict(sender.answers),
        "unanswered": unanswered,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=float("nan")),
        "schedule_seconds": schedule_seconds,
        "max_late_ms": late * 1000,
        "peak_connections": sender.peak_open,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--bodies", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--max-connections", type=int, default=1100)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    bodies = Path(args.bodies).read_bytes().splitlines()
    print(orjson.dumps(asyncio.run(run(args, bodies))).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
