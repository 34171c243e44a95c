"""Server CPU per request that `relay ingress` spends on unauthenticated worst-case requests.

Starts `relay ingress` from --code-dir (default: this checkout) on a temporary config, sends each
case --requests times over --concurrency keep-alive connections, and reads the process's CPU
time (utime + stime in /proc/<pid>/stat) before and after. The table shows, per case, the median
over --rounds (cases alternate within each round) of server CPU ms per request, the same from
schedstat (nanoseconds, not clock ticks), the client's requests/s as an aside, and the answers
by status. Last, one connection trickles its body at 1 byte/s: how long does the server hold it?
The same venv serves both checkouts, with the same max_body_bytes, so that "before" and "after"
differ only in relay's code. From the repo root:

    python -m tests.bench.hostile                                    # after: this checkout
    git worktree add /tmp/relay-before d8a467c
    python -m tests.bench.hostile --code-dir /tmp/relay-before       # before
    git worktree remove --force /tmp/relay-before

Needs RabbitMQ on --amqp-url (valid-small is published). Deletes the queues and exchanges its
config declared; never relay.unrouted, relay.state or relay.archive. Every step has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import itertools
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.exceptions
import aiohttp

from relay.config import load as load_config
from relay.providers import PROVIDERS
from relay.settings import SourceSettings

ROOT = Path(__file__).resolve().parents[2]
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PROTECTED = frozenset({"relay.unrouted", "relay.state", "relay.archive"})  # shared: kept

SOURCE_PATH = "/webhooks/envoice"
SECRET = "bench-secret"
SIGNATURE = "a" * 64  # well-formed, never valid
TIMESTAMP = "2026-11-28T12:00:00Z"
ENVELOPE = f'{{"Signature":"{SIGNATURE}","Timestamp":"{TIMESTAMP}","Activity":'.encode()
BOMB_INFLATED = b"{" + b" " * (8 * 1024 * 1024) + b"}"

STARTUP_SECONDS = 30.0  # for /healthz and /readyz to answer 200
STOP_SECONDS = 15.0  # after SIGTERM, before SIGKILL (the ingress drains up to 10 s)
REQUEST_SECONDS = 30.0  # one request, connecting included
SETTLE_SECONDS = 1.0  # after a round, for the server's CPU time to stop moving
SETTLE_POLL_SECONDS = 0.05
READY_POLL_SECONDS = 0.1
CLEANUP_SECONDS = 15.0
SLOW_LENGTH = 100  # the slow body's Content-Length
IMPRECISE_TICKS = 20  # rounds with less server CPU than this many ticks are flagged
NAN = float("nan")


class BenchError(Exception):
    """The benchmark cannot go on: the ingress did not start, or died."""


# --- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    body: Callable[[int], bytes]  # the body of the i-th request of a round
    headers: Mapping[str, str]
    wire_bytes: int
    note: str = ""


JSON_HEADERS = {"Content-Type": "application/json"}


def constant(body: bytes) -> Callable[[int], bytes]:
    return lambda _: body


def members_filling(prefix: bytes, suffix: bytes, limit: int) -> bytes:
    """`prefix` + `"k00000":1,"k00001":1,...` + `suffix`: as many members as fit in `limit`."""
    members: list[bytes] = []
    size = len(prefix) + len(suffix)
    for i in itertools.count():
        member = b'"k%05d":1' % i
        grown = size + len(member) + (1 if members else 0)
        if grown > limit:
            break
        members.append(member)
        size = grown
    return prefix + b",".join(members) + suffix


def valid_bodies(source: SourceSettings) -> Callable[[int], bytes]:
    """Correctly signed small webhooks, each with an event id of its own (no duplicates)."""
    event_ids = itertools.count(time.time_ns() // 1000)
    provider = PROVIDERS[source.scheme]

    def body(i: int) -> bytes:
        sample = provider.sample(source, event_id=next(event_ids), key=i % 100 + 1, now=time.time())
        return sample.body

    return body


def cases(limit: int, source: SourceSettings) -> list[Case]:
    bomb = gzip.compress(BOMB_INFLATED)
    string_head = ENVELOPE + b'{"Message":"'
    string_tail = b'"}}'
    plain: dict[str, bytes] = {
        "whitespace": b"{" + b" " * (limit - 2) + b"}",
        "many-keys-top": members_filling(b"{", b"}", limit),
        "many-keys-activity": members_filling(ENVELOPE + b"{", b"}}", limit),
        "many-keys-activity-not-last": members_filling(ENVELOPE + b"{", b'},"Z":1}', limit),
        "big-string": string_head
        + b"x" * (limit - len(string_head) - len(string_tail))
        + string_tail,
    }
    valid = valid_bodies(source)
    made = [
        Case(
            "gzip-bomb",
            constant(bomb),
            {**JSON_HEADERS, "Content-Encoding": "gzip"},
            len(bomb),
            f"gzip, inflates to {len(BOMB_INFLATED):,} bytes",
        ),
        *(Case(name, constant(body), JSON_HEADERS, len(body)) for name, body in plain.items()),
        Case("valid-small", valid, JSON_HEADERS, len(valid(0)), "signed, published"),
    ]
    for case in made:
        assert case.wire_bytes <= limit, f"{case.name}: {case.wire_bytes} bytes > {limit}"
    return made


# --- the ingress process ----------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    exchange: str
    handler: str

    @classmethod
    def unique(cls) -> Names:
        tag = uuid.uuid4().hex[:8]
        return cls(exchange=f"relay.bench-hostile-{tag}", handler=f"hostilebench{tag}")

    @property
    def queues(self) -> list[str]:
        return [f"relay.{self.handler}.{q}" for q in ("0", "dlq", "outcomes")]

    @property
    def exchanges(self) -> list[str]:
        return [f"relay.{self.handler}", self.exchange]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_config(path: Path, names: Names, port: int, max_body_bytes: int) -> None:
    """Only keys that both the old and the new code know (the old one refuses unknown keys)."""
    quote = json.dumps  # a JSON string of ASCII is a TOML basic string
    path.write_text(
        f"""[broker]
exchange = {quote(names.exchange)}

[ingress]
host = "127.0.0.1"
port = {port}
max_body_bytes = {max_body_bytes}

[[sources]]
name = "envoice"
path = {quote(SOURCE_PATH)}
scheme = "envoice"
secrets = [{quote(SECRET)}]

[[handlers]]
name = {quote(names.handler)}
events = ["envoice.#"]
call = "relay.handlers:log"
partitions = 1
""",
        encoding="utf-8",
    )


def child_env(code_dir: Path, amqp_url: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code_dir), "RELAY_AMQP_URL": amqp_url}


def describe_code(python: str, code_dir: Path, amqp_url: str) -> str:
    """Which commit --code-dir is at, and where the ingress's `relay` is imported from."""

    def run(*command: str) -> str:
        try:
            done = subprocess.run(
                command,
                cwd=code_dir,
                env=child_env(code_dir, amqp_url),
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    commit = run("git", "rev-parse", "--short", "HEAD") or "not a git checkout"
    if commit and run("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    imported = run(python, "-c", "import relay; print(relay.__file__)") or "?"
    return f"{code_dir} ({commit}); relay imported from {imported}"


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def sched_seconds(pid: int) -> float | None:
    """Time on CPU of the live threads of `pid` in seconds, to the nanosecond (the first field of
    /proc/<pid>/task/*/schedstat; the same clock as utime + stime, without the tick rounding);
    None where the kernel does not offer it."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text(encoding="ascii").split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended
        except (OSError, ValueError, IndexError):
            return None
    return total / 1e9


@dataclass(frozen=True)
class Cpu:
    ticks: float  # utime + stime, in seconds
    sched: float | None  # schedstat, in seconds

    @classmethod
    def of(cls, pid: int) -> Cpu:
        return cls(cpu_seconds(pid), sched_seconds(pid))

    def __sub__(self, other: Cpu) -> Cpu:
        sched = None if self.sched is None or other.sched is None else self.sched - other.sched
        return Cpu(self.ticks - other.ticks, sched)


async def settled_cpu(pid: int) -> Cpu:
    """The CPU time once it stops moving (connections closing, logs written), or after
    SETTLE_SECONDS."""
    deadline = time.monotonic() + SETTLE_SECONDS
    last = Cpu.of(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_POLL_SECONDS)
        now = Cpu.of(pid)
        if now.ticks == last.ticks:
            return now
        last = now
    return last


class Ingress:
    """`relay ingress` as a subprocess of code_dir, its output in a log file."""

    def __init__(self, python: str, code_dir: Path, config: Path, log: Path, url: str) -> None:
        self.python, self.code_dir, self.config, self.log, self.url = (
            python, code_dir, config, log, url
        )  # fmt: skip
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, amqp_url: str) -> None:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.python, "-m", "relay", "ingress", "--config", str(self.config),
                "--log-level", "warning",
                cwd=self.code_dir, env=child_env(self.code_dir, amqp_url),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                self.check_alive()
                if all([await self._ok(session, "/healthz"), await self._ok(session, "/readyz")]):
                    return
                if time.monotonic() > deadline:
                    raise BenchError(f"ingress not ready within {STARTUP_SECONDS:g} s")
                await asyncio.sleep(READY_POLL_SECONDS)

    async def _ok(self, session: aiohttp.ClientSession, path: str) -> bool:
        try:
            async with session.get(self.url + path) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    def check_alive(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise BenchError(f"ingress exited with code {self.process.returncode}")

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_SECONDS; the exit code."""
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_SECONDS):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        return process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def delete_broker_objects(amqp_url: str, names: Names) -> list[str]:
    """Delete the queues and exchanges the config declared; the names not deleted."""
    failed: list[str] = []
    objects = [("queue", name) for name in names.queues]
    objects += [("exchange", name) for name in names.exchanges]
    try:
        async with asyncio.timeout(CLEANUP_SECONDS):
            connection = await aio_pika.connect(amqp_url)
            async with connection:
                for kind, name in objects:
                    assert name not in PROTECTED
                    try:  # a channel each: a failed delete closes its channel
                        channel = await connection.channel()
                        if kind == "queue":
                            await channel.queue_delete(name)
                        else:
                            await channel.exchange_delete(name)
                        await channel.close()
                    except aio_pika.exceptions.AMQPError:
                        pass  # it was never declared
    except (aio_pika.exceptions.AMQPError, OSError, TimeoutError) as exc:
        failed = [f"{name} ({exc!r})" for _, name in objects]
    return failed


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Round:
    cpu: Cpu
    wall_seconds: float
    answers: Counter[str]
    timed_out: bool

    @property
    def done(self) -> int:
        return sum(self.answers.values())

    @property
    def cpu_ms_per_request(self) -> float:
        """From utime + stime: the figure this benchmark reports."""
        return 1000 * self.cpu.ticks / self.done if self.done else NAN

    @property
    def sched_ms_per_request(self) -> float:
        """From schedstat: the same, without the tick rounding."""
        return 1000 * self.cpu.sched / self.done if self.done and self.cpu.sched else NAN

    @property
    def requests_per_second(self) -> float:
        return self.done / self.wall_seconds if self.wall_seconds else NAN


@dataclass
class Result:
    case: Case
    rounds: list[Round] = field(default_factory=list)

    @property
    def cpu_ms_per_request(self) -> float:
        return statistics.median(r.cpu_ms_per_request for r in self.rounds)

    @property
    def sched_ms_per_request(self) -> float:
        return statistics.median(r.sched_ms_per_request for r in self.rounds)

    @property
    def requests_per_second(self) -> float:
        return statistics.median(r.requests_per_second for r in self.rounds)

    @property
    def answers(self) -> Counter[str]:
        return sum((r.answers for r in self.rounds), Counter())

    @property
    def imprecise(self) -> bool:
        return any(r.cpu.ticks * TICKS_PER_SECOND < IMPRECISE_TICKS for r in self.rounds)


async def run_round(
    case: Case, url: str, ingress: Ingress, *, requests: int, concurrency: int, seconds: float
) -> Round:
    answers: Counter[str] = Counter()
    indexes = itertools.count()
    timed_out = False
    timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:

        async def send() -> None:
            while (i := next(indexes)) < requests:
                try:  # data=bytes and no compress=: sent as is, Content-Encoding untouched
                    async with session.post(url, data=case.body(i), headers=case.headers) as r:
                        await r.read()
                    answers[str(r.status)] += 1
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    answers[type(exc).__name__] += 1

        before = Cpu.of(ingress.pid)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(seconds):
                await asyncio.gather(*(send() for _ in range(concurrency)))
        except TimeoutError:
            timed_out = True
        wall = time.perf_counter() - started
    ingress.check_alive()
    after = await settled_cpu(ingress.pid)
    return Round(after - before, wall, answers, timed_out)


@dataclass
class Slow:
    seconds: float | None  # until the server answered or closed; None: still open
    status_line: str
    limit: float

    def text(self) -> str:
        if self.seconds is None:
            return f">{self.limit:g} s, still open"
        answer = self.status_line or "closed without an answer"
        return f"{answer} after {self.seconds:.1f} s"


async def slow_body(host: str, port: int, limit: float) -> Slow:
    """Headers with Content-Length SLOW_LENGTH, then the body at 1 byte/s for at most `limit`
    seconds: how long until the server answers or closes?"""
    reader, writer = await asyncio.open_connection(host, port)
    body = b"{" + b" " * (SLOW_LENGTH - 2) + b"}"

    async def trickle() -> None:
        for i in range(len(body)):
            writer.write(body[i : i + 1])
            await writer.drain()
            await asyncio.sleep(1.0)  # the attack's pace, not a wait for anything

    writer.write(
        f"POST {SOURCE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {SLOW_LENGTH}\r\n\r\n".encode()
    )
    await writer.drain()
    started = time.monotonic()
    trickling = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(limit):
            received = await reader.read(65536)  # b"" when closed
        return Slow(time.monotonic() - started, received.split(b"\r\n")[0].decode("latin-1"), limit)
    except TimeoutError:
        return Slow(None, "", limit)
    except ConnectionError:
        return Slow(time.monotonic() - started, "", limit)
    finally:
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await trickling
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def say(what: str) -> None:
    print(what, file=sys.stderr, flush=True)


async def bench(args: argparse.Namespace, directory: Path) -> tuple[list[Result], Slow, str]:
    names = Names.unique()
    port = free_port()
    config = directory / "relay.toml"
    write_config(config, names, port, args.max_body_bytes)
    source = load_config(config).sources[0]  # this checkout's code, not --code-dir's
    base_url = f"http://127.0.0.1:{port}"
    ingress = Ingress(args.python, args.code_dir, config, directory / "ingress.log", base_url)
    results = [Result(case) for case in cases(args.max_body_bytes, source)]
    say(f"ingress on {base_url}, exchange {names.exchange}, log {ingress.log}")
    try:
        await ingress.start(args.amqp_url)
        for number in range(1, args.rounds + 1):
            for result in results:
                round_ = await run_round(
                    result.case, base_url + SOURCE_PATH, ingress,
                    requests=args.requests, concurrency=args.concurrency,
                    seconds=args.case_seconds,
                )  # fmt: skip
                result.rounds.append(round_)
                say(
                    f"round {number}/{args.rounds} {result.case.name}: "
                    f"{round_.cpu_ms_per_request:.3f} ms/request "
                    f"(schedstat {round_.sched_ms_per_request:.3f}), "
                    f"{format_answers(round_.answers)}"
                    + (" (timed out)" if round_.timed_out else "")
                )
        say(f"slow-body: trickling 1 byte/s for at most {args.slow_seconds:g} s")
        slow = await slow_body("127.0.0.1", port, args.slow_seconds)
        ingress.check_alive()
    except BaseException:
        say(f"--- ingress log, last lines ---\n{ingress.log_tail()}\n---")
        raise
    finally:
        code = await ingress.stop()
        if code not in (0, None, -signal.SIGTERM):
            say(f"ingress exited with code {code}\n{ingress.log_tail()}")
        failed = await delete_broker_objects(args.amqp_url, names)
        if failed:
            say("could not delete: " + ", ".join(failed))
    return results, slow, describe_code(args.python, args.code_dir, args.amqp_url)


# --- output -----------------------------------------------------------------------------------


def format_answers(answers: Counter[str]) -> str:
    return ", ".join(f"{status}: {n}" for status, n in sorted(answers.items()))


def table(results: list[Result], slow: Slow, code: str, args: argparse.Namespace) -> str:
    header = ("case", "body bytes", "CPU ms/req", "rounds", "schedstat", "req/s", "answers")
    rows = [
        (
            r.case.name,
            f"{r.case.wire_bytes:,}",
            f"{r.cpu_ms_per_request:.3f}",
            " ".join(f"{x.cpu_ms_per_request:.3f}" for x in r.rounds),
            f"{r.sched_ms_per_request:.3f}",
            f"{r.requests_per_second:,.0f}",
            format_answers(r.answers)
            + (" (timed out)" if any(x.timed_out for x in r.rounds) else ""),
        )
        for r in results
    ]
    rows.append(("slow-body", f"{SLOW_LENGTH} declared", "-", "-", "-", "-", slow.text()))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 4, 5}

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    notes = [f"{r.case.name}: {r.case.note}" for r in results if r.case.note]
    if any(r.imprecise for r in results):
        notes.append(
            f"some rounds used under {IMPRECISE_TICKS} clock ticks of server CPU "
            f"(1 tick = {1000 / TICKS_PER_SECOND:g} ms): more --requests for precision"
        )
    return "\n".join(
        [
            f"relay ingress: {code}",
            f"max_body_bytes={args.max_body_bytes}, {args.requests} requests x {args.rounds} "
            f"rounds per case, {args.concurrency} connections",
            "CPU ms/req: server utime+stime per request, median round (rounds: each round);",
            "schedstat: the same from /proc/<pid>/task/*/schedstat, without tick rounding (median)",
            "",
            line(header),
            line(tuple("-" * w for w in widths)),
            *(line(row) for row in rows),
            "",
            *notes,
        ]
    )


def finite(value: float) -> float | None:
    """NaN (no request answered, no schedstat) as JSON null."""
    return None if math.isnan(value) else value


def as_json(results: list[Result], slow: Slow, code: str, args: argparse.Namespace) -> str:
    document: dict[str, Any] = {
        "code": code,
        "max_body_bytes": args.max_body_bytes,
        "requests": args.requests,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "clock_ticks_per_second": TICKS_PER_SECOND,
        "cases": [
            {
                "case": r.case.name,
                "body_bytes": r.case.wire_bytes,
                "note": r.case.note,
                "cpu_ms_per_request": finite(r.cpu_ms_per_request),
                "schedstat_ms_per_request": finite(r.sched_ms_per_request),
                "requests_per_second": finite(r.requests_per_second),
                "answers": dict(r.answers),
                "rounds": [
                    {
                        "cpu_seconds": x.cpu.ticks,
                        "schedstat_seconds": x.cpu.sched,
                        "requests": x.done,
                        "wall_seconds": x.wall_seconds,
                        "cpu_ms_per_request": finite(x.cpu_ms_per_request),
                        "schedstat_ms_per_request": finite(x.sched_ms_per_request),
                        "answers": dict(x.answers),
                        "timed_out": x.timed_out,
                    }
                    for x in r.rounds
                ],
            }
            for r in results
        ],
        "slow_body": {
            "seconds_until_answer_or_close": slow.seconds,
            "status_line": slow.status_line,
            "limit_seconds": slow.limit,
            "text": slow.text(),
        },
    }
    return json.dumps(document, indent=2, allow_nan=False)


# --- command line -----------------------------------------------------------------------------


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.hostile",
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--code-dir", type=Path, default=ROOT, help="checkout whose relay serves (this one)"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the ingress (this one)"
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("RELAY_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/",
        help="broker ($RELAY_AMQP_URL, else guest on 127.0.0.1:5672)",
    )
    parser.add_argument("--requests", type=positive_int, default=200, help="per case round (200)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="of every case (3)")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="connections (4)")
    parser.add_argument(
        "--max-body-bytes", type=int, default=262_144, help="ingress.max_body_bytes (262144)"
    )
    parser.add_argument(
        "--case-seconds", type=float, default=120.0, help="deadline of one case round (120)"
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=15.0, help="how long to trickle slow-body (15)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.max_body_bytes < 1024:
        parser.error("--max-body-bytes must be at least 1024")
    args.code_dir = args.code_dir.resolve()
    if not (args.code_dir / "relay" / "__main__.py").is_file():
        parser.error(f"--code-dir {args.code_dir}: no relay/__main__.py there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relay-bench-hostile-") as directory:
        try:
            results, slow, code = asyncio.run(bench(args, Path(directory)))
        except BenchError as exc:
            say(f"hostile: {exc}")
            return 1
    print(as_json(results, slow, code, args) if args.json else table(results, slow, code, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
