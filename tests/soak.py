"""Soak: webhook traffic through relay's processes while faults hit them, then the count.

An ingress and two workers run as subprocesses with two HTTP handlers served in this process
("billing": 4 partitions, a little slow; "audit": 2 partitions). A provider sends webhooks for
many invoices, each invoice's in order, sending again later what is not accepted. Meanwhile, at
random intervals, one fault at a time: a worker is killed (-9) and restarted; the broker app is
stopped for a few seconds (rabbitmqctl stop_app / start_app) while the handlers fail, so that a
backlog waits across the restart; a handler fails for a few seconds (503, or hangs past its
timeout). Every kind of fault happens at least once, however short the run. Then the faults
stop, sending stops, everything drains (bounded), and ONE line is printed on stdout:

    accepted=N delivered=N lost=N reordered=N duplicates=N late_repeats=N max_duplicates=N
    faults=kill:N,broker:N,handler:N faults_failed=N

Every count is per (handler, webhook) pair, summed over both handlers, so accepted is twice the
webhooks the ingress accepted. delivered: accepted pairs delivered at least once; lost: accepted
pairs never delivered; reordered: (handler, invoice) sequences whose de-duplicated delivery order
(first delivery of each webhook) differs from the acceptance order; duplicates: deliveries beyond
the first, late_repeats those of them that came after a later webhook of their invoice;
max_duplicates: the crash window the faults may open (per worker kill or broker restart, one
delivery in flight per invoice and handler: docs/GUARANTEES.md; a webhook published
twice, its first confirm lost and answered 503, reaches each handler once); faults: how many of
each kind happened. Progress goes to stderr, and a fault that could not be injected. Exit code 0
iff nothing was lost or reordered, duplicates <= max_duplicates, every kind of fault happened and
none failed.

Talks only to 127.0.0.1; restores the broker on every exit, Ctrl-C included; deletes its queues
and exchanges; keeps the processes' logs (their directory is printed) when something is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import operator
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.handlers_for_tests import HANG, Answer, HttpHandler
from tests.processes import (
    Broker,
    Config,
    EnvoiceSender,
    Relay,
    RelayProcess,
    Tally,
    http_deliveries,
    in_background,
    partitions_empty,
)

LOCAL_AMQP = os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
HANDLER_OPTIONS = {"max_attempts": 5, "backoff_initial_ms": 50, "backoff_max_ms": 1000}
TIMEOUT_SECONDS = 1.0  # a handler's timeout: a hanging handler is given up on after this
FAULT_GAP_SECONDS = (2.0, 6.0)  # random wait between faults
FAULT_SECONDS = (2.0, 5.0)  # how long the broker stays down, or a handler fails
BACKLOG_SECONDS = 2.0  # handlers fail this long after a broker restart
BACKLOG_DEADLINE_SECONDS = 30.0  # for each handler to have refused a delivery before a restart
KINDS = ("kill", "broker", "handler")
SEND_STOP_SECONDS = 60.0  # for the webhooks in flight when sending stops to be accepted
DRAIN_SECONDS = 180.0  # for everything accepted to be delivered after the faults


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="of faults and traffic (5)")
    parser.add_argument("--seed", type=int, help="for the faults: kinds, order, timing")
    parser.add_argument("--invoices", type=int, default=50, help="invoices sending at once (50)")
    parser.add_argument(
        "--pause", type=float, default=0.5, help="mean seconds between an invoice's webhooks (0.5)"
    )
    return parser.parse_args(argv)


def say(started: float, what: str) -> None:
    print(f"[{time.monotonic() - started:7.1f}s] {what}", file=sys.stderr, flush=True)


class Soak:
    """One soak run: relay's processes, two handlers, the provider, the faults, the drain."""

    def __init__(self, args: argparse.Namespace, broker: Broker, directory: Path) -> None:
        self.args, self.broker = args, broker
        self.random = random.Random(args.seed)
        self.started = time.monotonic()
        self.faults_failed = 0
        self.faults: dict[str, int] = dict.fromkeys(KINDS, 0)  # faults that happened, by kind
        self.relay = Relay(directory, url=LOCAL_AMQP, quiet=True)
        self.handlers = {"billing": HttpHandler(), "audit": HttpHandler()}
        self.handlers["billing"].latency = 0.005  # so that a worker killed is likely mid-delivery
        self.workers: list[RelayProcess] = []

    def say(self, what: str) -> None:
        say(self.started, what)

    async def run(self) -> Tally:
        async with contextlib.AsyncExitStack() as stack:  # undone in reverse order
            await stack.enter_async_context(self.relay)
            for handler in self.handlers.values():
                await stack.enter_async_context(handler)
            stack.push_async_callback(self._undo_faults)
            # Given relay's processes, two HTTP handlers and a provider sending webhooks
            config = await self._start()
            sender = EnvoiceSender.to(config, pause_seconds=self.args.pause, retry_seconds=0.5)
            stop_sending = asyncio.Event()
            invoices = range(1, self.args.invoices + 1)
            sending = await stack.enter_async_context(
                in_background(sender.send(invoices, stop=stop_sending))
            )
            # When faults hit, one at a time, for the given minutes
            await self._inject_faults(config, until=self.started + self.args.minutes * 60)
            await self._undo_faults()
            stop_sending.set()
            self.say(f"faults over; {len(sender.ledger)} webhooks accepted so far; sending stops")
            await asyncio.wait_for(sending, SEND_STOP_SECONDS)
            self.say(f"ingress answers: {dict(sender.answers)}; draining")
            # Then everything accepted is delivered, each invoice's in order
            return await self._drain(sender, config)

    async def _start(self) -> Config:
        config = self.relay.config(
            self._handler("billing", partitions=4), self._handler("audit", partitions=2)
        )
        _, *self.workers = await self.relay.start(config, workers=2)
        self.say(f"ingress and 2 workers up; logs in {self.relay.directory}")
        return config

    def _handler(self, name: str, *, partitions: int) -> dict[str, Any]:
        return {
            "name": name,
            "events": ["envoice.#"],
            "url": self.handlers[name].url,
            "partitions": partitions,
            "timeout_seconds": TIMEOUT_SECONDS,
            **HANDLER_OPTIONS,
        }

    @property
    def max_duplicates(self) -> int:
        """What the faults may repeat: their crash window (see the module's docstring)."""
        handlers, invoices = len(self.handlers), int(self.args.invoices)
        cuts = self.faults["kill"] + self.faults["broker"]
        return cuts * handlers * invoices

    async def _inject_faults(self, config: Config, *, until: float) -> None:
        """Every kind of fault in turn, in a random order each round, at random intervals, until
        `until` once the first round is complete."""
        kinds: dict[str, Callable[[], Awaitable[None]]] = {
            "kill": functools.partial(self._kill_worker, config),
            "broker": self._bounce_broker,
            "handler": self._fail_handler,
        }
        turn = self.random.sample(list(kinds), len(kinds))
        while True:
            await asyncio.sleep(self.random.uniform(*FAULT_GAP_SECONDS))
            if time.monotonic() >= until and all(self.faults.values()):
                return
            turn = turn or self.random.sample(list(kinds), len(kinds))
            kind = turn.pop()
            try:
                await kinds[kind]()
            except Exception as exc:  # report it, count it, go on: the tally still matters
                self.faults_failed += 1
                self.say(f"FAULT FAILED: {type(exc).__name__}: {exc}")
                await self._undo_faults()
            else:
                self.faults[kind] += 1

    async def _kill_worker(self, config: Config) -> None:
        index = self.random.randrange(len(self.workers))
        victim = self.workers[index]
        self.say(f"kill -9 worker {victim.process.pid}")
        await victim.kill()
        await asyncio.sleep(self.random.uniform(0, 2))
        self.workers[index] = await self.relay.worker(config)
        self.say(f"worker {self.workers[index].process.pid} started")

    async def _bounce_broker(self) -> None:
        """stop_app for a few seconds, then start_app, while the handlers fail (503) from a little
        before until a little after: a backlog waits in every partition across the restart."""
        self.say("handlers: answer 503 (a backlog builds)")
        refused_before = {name: self._refused(h) for name, h in self.handlers.items()}
        self._answer_all(503)
        deadline = time.monotonic() + BACKLOG_DEADLINE_SECONDS
        while any(self._refused(h) <= refused_before[n] for n, h in self.handlers.items()):
            if time.monotonic() > deadline:
                raise TimeoutError("the handlers were not tried while they answered 503")
            await asyncio.sleep(0.1)  # a poll with a deadline: each handler has a backlog
        self.say("broker: stop_app")
        await self.broker.stop()
        await asyncio.sleep(self.random.uniform(*FAULT_SECONDS))
        self.say("broker: start_app")
        await self.broker.start()
        self.say("broker accepts connections again")
        await asyncio.sleep(BACKLOG_SECONDS)
        self._answer_all(200)
        self.say("handlers: answer 200")

    async def _fail_handler(self) -> None:
        name = self.random.choice(sorted(self.handlers))
        choices: list[Answer] = [503, HANG]
        answer = self.random.choice(choices)
        self.say(f"handler {name}: answers {answer}")
        self.handlers[name].default = answer
        await asyncio.sleep(self.random.uniform(*FAULT_SECONDS))
        self.handlers[name].default = 200
        self.say(f"handler {name}: answers 200")

    @staticmethod
    def _refused(handler: HttpHandler) -> int:
        return sum(r.status == 503 for r in handler.requests)

    def _answer_all(self, answer: Answer) -> None:
        for handler in self.handlers.values():
            handler.default = answer

    async def _undo_faults(self) -> None:
        """Handlers answer 200, the broker runs; a worker left dead by a failed fault is fatal."""
        self._answer_all(200)
        await self.broker.restore()
        for worker in self.workers:
            worker.check_running()

    async def _drain(self, sender: EnvoiceSender, config: Config) -> Tally:
        tallies: list[Tally] = []
        deadline = time.monotonic() + DRAIN_SECONDS
        for name, handler in self.handlers.items():
            deliveries = functools.partial(http_deliveries, handler)
            try:
                tally = await sender.ledger.delivered(
                    deliveries,
                    partitions_empty(config.settings, handlers=[name]),
                    timeout=max(1.0, deadline - time.monotonic()),
                    interval=1.0,
                )
            except AssertionError as exc:
                self.say(f"{name}: {exc}")
                tally = sender.ledger.check(deliveries())
            self.say(f"{name}: {tally}")
            tallies.append(tally)
        return functools.reduce(operator.add, tallies)


async def soak(args: argparse.Namespace, broker: Broker, directory: Path) -> tuple[Tally, Soak]:
    """The tally, and the run (its faults)."""
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    run = Soak(args, broker, directory)
    return await run.run(), run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    broker = Broker(LOCAL_AMQP)
    try:
        tally, run = asyncio.run(soak(args, broker, directory))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"soak: interrupted; logs in {directory}", file=sys.stderr)
        return 130
    finally:
        broker.restore_now()  # asyncio.run's clean-up restored it already, unless it was cut short
    faults = ",".join(f"{kind}:{n}" for kind, n in run.faults.items())
    print(f"{tally.line()} max_duplicates={run.max_duplicates} faults={faults} "
          f"faults_failed={run.faults_failed}", flush=True)  # fmt: skip
    passed = (
        tally.ok
        and tally.duplicates <= run.max_duplicates
        and all(run.faults.values())
        and not run.faults_failed
    )
    if passed:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        print(f"soak: FAILED: {tally}\nlogs in {directory}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
