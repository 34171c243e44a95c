"""relay under real conditions, for the end-to-end, fault and soak runs.

- `Relay`: config files and `relay` subprocesses (ingress, workers), cleaned up after;
- `Broker`: the local RabbitMQ app stopped and started with rabbitmqctl, and always restored;
- `EnvoiceSender`: webhooks POSTed to an ingress as Envoice sends them, retried until accepted;
- `Ledger`: what the ingress accepted, per invoice in order, and the check of deliveries against
  it (a `Tally`): nothing lost, nothing reordered, duplicates counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aio_pika
import aiohttp
import orjson

from relay.broker import BROKER_ERRORS
from relay.config import load as load_config
from relay.settings import Settings, SourceSettings
from tests.conftest import AMQP_URL, delete_topology, settings_dict
from tests.handlers_for_tests import HttpHandler
from tests.support import ROOT, activity, activity_ids, eventually, signed_body, toml

STARTUP_SECONDS = 20.0
EXIT_SECONDS = 20.0
BROKER_START_SECONDS = 60.0
RABBITMQCTL_SECONDS = 60.0  # for one rabbitmqctl command

Deliveries = Iterable[tuple[str, str]]  # (ordering key, message id) in the order delivered


# --- config files -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Config:
    """A config file for the relay processes, and what it says."""

    path: Path
    settings: Settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.ingress.port}"

    @property
    def webhook_url(self) -> str:
        return self.base_url + self.settings.sources[0].path


def write_config(
    path: Path,
    *handlers: dict[str, Any],
    url: str = AMQP_URL,
    sources: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> Config:
    """A config file with names of its own (exchange, handlers) and a free ingress port;
    `sections` add to the config's tables (`ingress={...}`, `worker={...}`, `source={...}`);
    `sources` replace the one Envoice source."""
    ingress = {"port": free_port(), **sections.pop("ingress", {})}
    raw = settings_dict(
        uuid.uuid4().hex[:8], handlers=list(handlers), url=url, ingress=ingress, **sections
    )
    if "," in url:  # a cluster's nodes
        raw["broker"]["url"] = url.split(",")
    if sources is not None:
        raw["sources"] = sources
    raw = {name: table for name, table in raw.items() if table != []}  # TOML has no empty array
    path.write_text(toml(raw), encoding="utf-8")
    assert tomllib.loads(path.read_text(encoding="utf-8")) == raw
    return Config(path, load_config(path))


# --- processes --------------------------------------------------------------------------------


class RelayProcess:
    """A `relay` command running as a subprocess, its output going to a file."""

    def __init__(self, args: tuple[str, ...], process: asyncio.subprocess.Process, log: Path):
        self.args, self.process, self.log = args, process, log

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines with this `event` the process wrote so far."""
        lines = (line for line in self.output().splitlines() if event in line)
        parsed = (orjson.loads(line) for line in lines if line.startswith("{"))
        return [entry for entry in parsed if entry.get("event") == event]

    def logged(self, event: str) -> int:
        """How many JSON log lines with this `event` the process wrote so far."""
        return len(self.events(event))

    def check_running(self) -> None:
        if not self.running:
            raise AssertionError(
                f"relay {self.args[0]} exited {self.process.returncode}:\n{self.output()}"
            )

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.process.wait(), EXIT_SECONDS)

    async def terminate(self) -> int:
        """SIGTERM, then the exit code: the process drains and exits by itself."""
        self.process.send_signal(signal.SIGTERM)
        return await self.exit_code()

    async def kill(self) -> None:
        """kill -9: a crash, nothing drained."""
        self.process.kill()
        await self.process.wait()


async def ingress_ready(ingress: RelayProcess, config: Config) -> bool:
    ingress.check_running()
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.get(config.base_url + "/readyz") as response,
        ):
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


def worker_consuming(worker: RelayProcess) -> bool:
    worker.check_running()
    return worker.logged("worker consuming") > 0


class Relay:
    """Config files and `relay` subprocesses, in `directory`.

    On close, processes still running are killed, their outputs printed (unless `quiet`: pytest
    shows them when a test fails), and everything the configs named on the broker is deleted.
    """

    def __init__(self, directory: Path, *, url: str = AMQP_URL, quiet: bool = False) -> None:
        self.directory, self.url, self.quiet = directory, url, quiet
        self.configs: list[Config] = []
        self.processes: list[RelayProcess] = []

    def config(
        self,
        *handlers: dict[str, Any],
        sources: list[dict[str, Any]] | None = None,
        **sections: dict[str, Any],
    ) -> Config:
        path = self.directory / f"relay-{len(self.configs)}.toml"
        self.configs.append(
            write_config(path, *handlers, url=self.url, sources=sources, **sections)
        )
        return self.configs[-1]

    async def run(
        self, *args: str, config: Config, env: dict[str, str] | None = None
    ) -> RelayProcess:
        """`python -m relay ARGS --config ...`, from the repository root."""
        log = self.directory / f"{len(self.processes)}-{args[0]}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", *args, "--config", str(config.path),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                cwd=ROOT, env={**os.environ, "RELAY_AMQP_URL": self.url, **(env or {})},
            )  # fmt: skip
        self.processes.append(RelayProcess(args, process, log))
        return self.processes[-1]

    async def worker(self, config: Config, *, env: dict[str, str] | None = None) -> RelayProcess:
        """`relay worker`, once it consumes."""
        worker = await self.run("worker", config=config, env=env)
        await eventually(
            lambda: worker_consuming(worker), timeout=STARTUP_SECONDS, what="worker consuming"
        )
        return worker

    async def start(
        self,
        config: Config,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        worker_args: tuple[str, ...] = (),
    ) -> tuple[RelayProcess, ...]:
        """`relay ingress` and `workers` x `relay worker` (with `worker_args`), started together;
        once all are ready."""
        ingress = await self.run("ingress", config=config)
        started = [
            await self.run("worker", *worker_args, config=config, env=env) for _ in range(workers)
        ]
        await eventually(
            lambda: ingress_ready(ingress, config), timeout=STARTUP_SECONDS, what="ingress ready"
        )
        await eventually(
            lambda: all(worker_consuming(w) for w in started),
            timeout=STARTUP_SECONDS,
            what="workers consuming",
        )
        return (ingress, *started)

    async def close(self) -> None:
        for relay in self.processes:
            if relay.running:
                await relay.kill()
            if not self.quiet:
                print(f"--- relay {' '.join(relay.args)} (exit {relay.process.returncode}):")
                print(relay.output())
        for config in self.configs:
            await delete_topology(config.settings)

    async def __aenter__(self) -> Relay:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# --- the broker -------------------------------------------------------------------------------


async def amqp_reachable(url: str) -> bool:
    try:
        connection = await aio_pika.connect(url, timeout=2)
    except BROKER_ERRORS:
        return False
    await connection.close()
    return True


class Broker:
    """The local RabbitMQ app, stopped and started with rabbitmqctl (the Erlang node stays up).

    Whoever stops it must restore it: `restore()`, or `restore_now()` from synchronous code.
    """

    def __init__(self, url: str = AMQP_URL) -> None:
        self.url = url
        self.stopped = False

    # What stop() and start() may take (their waits): for tests' timeouts.
    STOP_SECONDS = RABBITMQCTL_SECONDS
    START_SECONDS = RABBITMQCTL_SECONDS + BROKER_START_SECONDS

    async def stop(self) -> None:
        self.stopped = True  # from now on, restoring means starting it
        await self._rabbitmqctl("stop_app")

    async def start(self) -> None:
        """start_app, then wait until the broker accepts AMQP connections again."""
        await self._rabbitmqctl("start_app")
        self.stopped = False
        await eventually(
            lambda: amqp_reachable(self.url),
            timeout=BROKER_START_SECONDS,
            interval=0.2,
            what="the broker to accept AMQP connections",
        )

    async def restore(self) -> None:
        """Start the app if this object stopped it, or if it does not accept connections."""
        if self.stopped or not await amqp_reachable(self.url):
            await self.start()

    def restore_now(self) -> None:
        if self.stopped:
            subprocess.run(["rabbitmqctl", "start_app"], timeout=120, check=False)
            self.stopped = False

    @staticmethod
    async def _rabbitmqctl(command: str) -> None:
        process = await asyncio.create_subprocess_exec(
            "rabbitmqctl", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await asyncio.wait_for(process.communicate(), RABBITMQCTL_SECONDS)
        if process.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {command} exited {process.returncode}: {output!r}")


# --- tasks ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_background(coroutine: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Runs `coroutine` as a task for the block; cancelled if still running at the end."""
    task = asyncio.create_task(coroutine)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- traffic and its check --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tally:
    """How deliveries compare with what the ingress accepted (see `Ledger.check`)."""

    accepted: int  # webhooks accepted (answered 200)
    delivered: int  # accepted webhooks delivered at least once
    lost: int  # accepted webhooks never delivered
    reordered: int  # keys whose first deliveries are not in acceptance order
    duplicates: int  # deliveries beyond the first of a webhook
    # repeats that came after a later webhook of their key had been delivered: a handler that
    # does not drop repeats by id would see its key go back in time
    late_repeats: int = 0
    problems: tuple[str, ...] = ()  # the first few, for a failing assertion

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.reordered == 0

    def line(self) -> str:
        return (
            f"accepted={self.accepted} delivered={self.delivered} lost={self.lost} "
            f"reordered={self.reordered} duplicates={self.duplicates} "
            f"late_repeats={self.late_repeats}"
        )

    def __str__(self) -> str:
        return "\n  ".join((self.line(), *self.problems))

    def __add__(self, other: Tally) -> Tally:
        """Both tallies together (e.g. of two handlers: then each counts per handler)."""
        return Tally(
            accepted=self.accepted + other.accepted,
            delivered=self.delivered + other.delivered,
            lost=self.lost + other.lost,
            reordered=self.reordered + other.reordered,
            duplicates=self.duplicates + other.duplicates,
            late_repeats=self.late_repeats + other.late_repeats,
            problems=self.problems + other.problems,
        )


class Ledger:
    """The ids the ingress accepted (answered 200), per ordering key in acceptance order."""

    def __init__(self) -> None:
        self.accepted: dict[str, list[str]] = {}
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def accept(self, key: str, message_id: str) -> None:
        if message_id not in self._ids:
            self._ids.add(message_id)
            self.accepted.setdefault(key, []).append(message_id)

    def check(self, deliveries: Deliveries) -> Tally:
        """Compare `deliveries` with what was accepted.

        Every accepted id must be delivered at least once (else it is lost), and for each key the
        ids in order of their first delivery must be the accepted ids in acceptance order (else
        the key is reordered). Deliveries beyond an id's first are duplicates; a duplicate that
        comes after a later-accepted id of its key was delivered is also a late repeat. Deliveries
        of ids never accepted are left out: the ingress may publish a webhook it answered 503 for.
        """
        times: Counter[str] = Counter()
        first: dict[str, list[str]] = {}
        rank = {i: n for ids in self.accepted.values() for n, i in enumerate(ids)}
        latest: dict[str, int] = {}  # per key, the highest rank delivered so far
        late: list[str] = []
        for key, message_id in deliveries:
            if message_id in self._ids:
                if not times[message_id]:
                    first.setdefault(key, []).append(message_id)
                elif rank[message_id] < latest.get(key, -1):
                    late.append(message_id)
                latest[key] = max(latest.get(key, -1), rank[message_id])
                times[message_id] += 1
        lost = [i for ids in self.accepted.values() for i in ids if not times[i]]
        problems = [f"lost: {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}"] if lost else []
        reordered = 0
        for key in sorted(self.accepted.keys() | first.keys()):
            expected = [i for i in self.accepted.get(key, []) if times[i]]
            got = first.get(key, [])
            if got != expected:
                reordered += 1
                at = _first_difference(got, expected)
                problems.append(
                    f"{key} reordered at #{at}: accepted {expected[at : at + 3]}, "
                    f"delivered {got[at : at + 3]}"
                )
        if late:
            problems.append(f"late repeats: {', '.join(late[:5])}{' ...' if len(late) > 5 else ''}")
        return Tally(
            accepted=len(self._ids),
            delivered=len(times),
            lost=len(lost),
            reordered=reordered,
            duplicates=sum(times.values()) - len(times),
            late_repeats=len(late),
            problems=tuple(problems[:6]),
        )

    async def delivered(
        self,
        deliveries: Callable[[], Deliveries],
        drained: Settings | Callable[[], Awaitable[bool]],
        *,
        timeout: float,
        interval: float = 0.1,
    ) -> Tally:
        """Wait until every accepted id is delivered, then until the partitions hold no message,
        ready or unacknowledged; the tally then. Fails with the tally at the deadline (`timeout`,
        for both waits together).

        Taking the tally as soon as nothing is lost would miss repeats still on their way (a
        message a worker delivered but had not acked when it stopped comes again): a bound on
        `duplicates` could then pass with duplicates still coming. Once the partitions are empty
        nothing more can be delivered (a handler has a delivery before the worker acks it).
        `drained` is the settings, whose handlers' partitions are read with `partitions_empty`,
        or a probe of its own (e.g. of a cluster's node).
        """
        empty = partitions_empty(drained) if isinstance(drained, Settings) else drained
        deadline = time.monotonic() + timeout

        def everything_delivered() -> bool:
            return self.check(deliveries()).lost == 0

        try:
            await eventually(everything_delivered, timeout=timeout, interval=interval)
        except AssertionError:
            raise AssertionError(
                f"not all delivered within {timeout}s: {self.check(deliveries())}"
            ) from None
        try:
            await eventually(
                empty, timeout=max(0.0, deadline - time.monotonic()), interval=interval
            )
        except AssertionError:
            raise AssertionError(
                f"all delivered, but the partitions still held messages (a repeat may still "
                f"come) after {timeout}s: {empty}; {self.check(deliveries())}"
            ) from None
        return self.check(deliveries())


# The messages a quorum queue holds now, ready plus unacknowledged, from its Raft state on its
# leader. The management API's and `rabbitmqctl list_queues`' figures of a quorum queue are sampled
# (on the queue's tick, then by the statistics collector): they lag by up to ~10 s and may say 0
# while a message is in flight; `queue.declare` passive counts only ready messages. A queue that
# does not exist holds nothing; a figure that cannot be read is `unknown`.
_MESSAGES_IN = """
VHost = <<"{vhost}">>,
[try
   case rabbit_amqqueue:lookup(rabbit_misc:r(VHost, queue, Name)) of
     {{ok, Q}} ->
       {{ok, {{_, Total}}, _}} =
         ra:leader_query(amqqueue:get_pid(Q), fun rabbit_fifo:query_messages_total/1),
       {{total, Total}};
     {{error, not_found}} -> {{total, 0}}
   end
 catch _:_ -> unknown
 end || Name <- [{names}]].
"""


def _binary(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


async def messages_in(
    queues: Sequence[str], *, vhost: str, rabbitmqctl: Sequence[str] = ("rabbitmqctl",)
) -> list[int] | str:
    """How many messages each quorum queue holds now, ready plus unacknowledged; or, if that
    cannot be read, why not. `rabbitmqctl` is the command that reaches the broker's node."""
    names = ", ".join(f'<<"{_binary(name)}">>' for name in queues)
    expression = _MESSAGES_IN.format(vhost=_binary(vhost), names=names)
    try:
        process = await asyncio.create_subprocess_exec(
            *rabbitmqctl, "eval", expression,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), RABBITMQCTL_SECONDS)
    except (OSError, TimeoutError) as exc:
        return f"{rabbitmqctl[0]}: {type(exc).__name__}: {exc}"
    text = output.decode(errors="replace").strip()
    totals = re.findall(r"\{total,(\d+)\}", text)
    if process.returncode != 0 or len(totals) != len(queues):
        return f"{' '.join(rabbitmqctl)} eval exited {process.returncode}: {text[:300]}"
    return [int(total) for total in totals]


class PartitionsEmpty:
    """`await probe()`: whether the queues hold no message, ready or unacknowledged, now
    (`messages_in`); `str(probe)` says what it read last."""

    def __init__(
        self, queues: Sequence[str], *, vhost: str, rabbitmqctl: Sequence[str] = ("rabbitmqctl",)
    ) -> None:
        self.queues, self.vhost, self.rabbitmqctl = list(queues), vhost, tuple(rabbitmqctl)
        self.last: list[int] | str = "not read yet"

    async def __call__(self) -> bool:
        self.last = await messages_in(self.queues, vhost=self.vhost, rabbitmqctl=self.rabbitmqctl)
        return isinstance(self.last, list) and not any(self.last)

    def __str__(self) -> str:
        if isinstance(self.last, str):
            return f"could not read {', '.join(self.queues)}: {self.last}"
        held = {q: n for q, n in zip(self.queues, self.last, strict=True) if n}
        return f"messages held: {held or 'none'}"


def partitions_empty(
    settings: Settings,
    *,
    handlers: Iterable[str] | None = None,
    rabbitmqctl: Sequence[str] = ("rabbitmqctl",),
) -> PartitionsEmpty:
    """A probe of the partitions of `handlers` (names; all of the settings' if None)."""
    chosen = [h for h in settings.handlers if handlers is None or h.name in set(handlers)]
    queues = [queue for handler in chosen for queue in handler.queues]
    return PartitionsEmpty(queues, vhost=settings.broker.vhost, rabbitmqctl=rabbitmqctl)


def _first_difference(got: list[str], expected: list[str]) -> int:
    pairs = enumerate(zip(got, expected, strict=False))
    return next((n for n, (a, b) in pairs if a != b), min(len(got), len(expected)))


def billing_handler(handler: HttpHandler, **options: Any) -> dict[str, Any]:
    """A handler of every Envoice event posting to `handler`: 4 partitions, quick retries."""
    return {
        "name": "billing",
        "events": ["envoice.#"],
        "url": handler.url,
        "partitions": 4,
        "max_attempts": 5,
        "backoff_initial_ms": 50,
        "backoff_max_ms": 1000,
        "timeout_seconds": 5.0,
        **options,
    }


def http_deliveries(handler: HttpHandler) -> Deliveries:
    """What an HTTP handler took: the requests it answered 2xx."""
    return [(r.key, r.id) for r in handler.requests if r.accepted]


class EnvoiceSender:
    """POSTs signed Envoice webhooks to an ingress the way Envoice sends them.

    Each invoice's activities go one after the other, invoices concurrently. A webhook that is not
    accepted (503, an error, no answer) is sent again `retry_seconds` later, until it is, before
    that invoice's next one. Accepted ids go to `ledger`; every answer is counted in `answers`.
    """

    def __init__(
        self,
        url: str,
        source: SourceSettings,
        *,
        pause_seconds: float = 0.0,
        retry_seconds: float = 0.2,
        timeout_seconds: float = 10.0,
    ) -> None:
        self.url, self.source = url, source
        self.pause_seconds, self.retry_seconds = pause_seconds, retry_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.ledger = Ledger()
        self.answers: Counter[str] = Counter()  # "200 accepted", "503", "ClientConnectorError"
        self.timeline: list[tuple[float, str]] = []  # (time.monotonic(), answer) of each
        self.in_flight = 0  # requests sent and not answered yet

    @classmethod
    def to(cls, config: Config, **options: float) -> EnvoiceSender:
        """A sender to the ingress of `config`, signing for its first source."""
        return cls(config.webhook_url, config.settings.sources[0], **options)

    @property
    def refused(self) -> int:
        """Answers other than 200: what a provider would retry."""
        return self.refused_in()

    def count(self, since: float = 0.0, until: float = math.inf) -> Counter[str]:
        """The answers that came between `since` and `until` (time.monotonic())."""
        return Counter(answer for at, answer in self.timeline if since <= at < until)

    def refused_in(self, since: float = 0.0, until: float = math.inf) -> int:
        """Answers other than 200 between `since` and `until`."""
        counts = self.count(since, until)
        return sum(n for answer, n in counts.items() if not answer.startswith("200"))

    async def send(
        self, invoices: Iterable[int], each: int | None = None, *, stop: asyncio.Event | None = None
    ) -> None:
        """`each` webhooks for every invoice (no limit if None), fewer if `stop` is set first."""
        stop = stop or asyncio.Event()
        async with aiohttp.ClientSession(timeout=self._timeout) as client:
            await asyncio.gather(*(self._invoice(client, n, each, stop) for n in invoices))

    async def _invoice(
        self, client: aiohttp.ClientSession, invoice: int, each: int | None, stop: asyncio.Event
    ) -> None:
        for _ in range(each) if each is not None else itertools.count():
            if stop.is_set():
                return
            event_id = next(activity_ids)
            act = activity(Id=event_id, InvoiceId=invoice, InvoiceNumber=f"INV-{invoice}")
            await self._post_until_accepted(client, act)
            self.ledger.accept(f"invoice:{invoice}", f"envoice:{event_id}")
            if self.pause_seconds:
                await asyncio.sleep(random.uniform(0, 2 * self.pause_seconds))

    async def _post_until_accepted(
        self, client: aiohttp.ClientSession, act: dict[str, Any]
    ) -> None:
        while True:
            if await self._accepted(client, act):
                return
            await asyncio.sleep(self.retry_seconds)

    async def _accepted(self, client: aiohttp.ClientSession, act: dict[str, Any]) -> bool:
        self.in_flight += 1
        try:
            async with client.post(self.url, data=signed_body(self.source, act)) as response:
                body = await response.json(content_type=None)
                status = body.get("status") if response.status == 200 else None
                answer = f"200 {status}" if status else str(response.status)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            answer = type(exc).__name__
        finally:
            self.in_flight -= 1
        self.answers[answer] += 1
        self.timeline.append((time.monotonic(), answer))
        return answer in ("200 accepted", "200 duplicate")
