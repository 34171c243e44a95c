"""relay on a three-node RabbitMQ cluster while a node dies; `deploy/cluster.sh run` runs it.

Needs the cluster of deploy/cluster.sh (`deploy/cluster.sh start`). Starts `relay ingress` and
two `relay worker`s given every node's address (broker.url as a list, here through
$RELAY_AMQP_URL), an HTTP handler with 4 partitions, and a provider sending 20 invoices at once,
each invoice's webhooks one after the other, every 503 sent again.

After --warmup seconds it stops (`stop_app`) or kills (-9) a node under load: by default the one
leading the most of the handler's partitions (--victim partitions), or the one leading the
archive (archive) or the handler's outcome log (outcomes); measures how long until every
partition has a leader on a running node again (`failover_seconds`); keeps the load on for
--seconds; starts the node again and measures how long until every partition has its three
members online (`recovered_seconds`) and every stream (the archive, the outcome log) its three
replicas (`streams_recovered_seconds`); keeps the load on for --warmup more seconds, stops it,
waits for everything accepted to be delivered.

Then it reads, from a node that stayed up and without writing anything into them, the archive
(this run's exchange, from the run's start) and the handler's outcome log, each up to the offset
its leader had committed (`rabbitmq-queues stream_status`) and then until quiet for
QUIET_SECONDS, and counts: `archived` (accepted ids in the archive), `archive_lost` (accepted,
not in the archive), `archive_reordered` (keys whose order in the archive is not their
acceptance order), `outcomes` (ids the handler answered 2xx with a `delivered` record; more than
`accepted` when webhooks the provider stopped waiting for at the end were delivered),
`outcomes_lost` (answered 2xx, no such record), `outcome_duplicates` (`delivered` records beyond
the first of an id: informational). One line:

    accepted=... delivered=... lost=0 reordered=0 duplicates=... failover_seconds=...
    ... archived=... archive_lost=0 archive_reordered=0 outcomes=... outcomes_lost=0 ...

`--fault rolling` restarts every node in turn instead (`stop_app`, --seconds down, `start_app`,
until its partitions' members and streams' replicas are online again, then the next) and adds
`refused=... refused_bound=...` (answers other than 200 the provider met; more fails the run).
`--fault partition` cuts the victim off (`deploy/cluster.sh cut`: its inter-node and client
traffic dropped) until the others see it gone and it paused itself (pause_minority), --seconds
more, heals it in any case, and adds `detected_seconds paused_seconds cut_seconds
refused_while_cut longest_without_accept_seconds ingress_moved_seconds` (when the ingress was
connected to another node), and prints when each relay process lost and made its
connections; `--victim ingress` cuts off the node of the ingress's publisher.
`delivered_in_seconds`: from the load's stop until everything accepted was delivered.

Exit 0 only if nothing accepted was lost or reordered, load was accepted after the fault, the
queues and streams recovered, and neither the archive nor the outcome log misses anything.
Every wait has a deadline.

    deploy/cluster.sh run --seconds 60 --fault kill
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aio_pika
import aiohttp
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from relay import topology, wire
from relay.broker import BROKER_ERRORS
from tests.handlers_for_tests import HttpHandler
from tests.processes import (
    EnvoiceSender,
    Ledger,
    PartitionsEmpty,
    Relay,
    RelayProcess,
    http_deliveries,
    in_background,
)
from tests.support import ROOT, eventually

CLUSTER = ROOT / "deploy" / "cluster.sh"
NODES = (1, 2, 3)
INVOICES = range(1, 21)
FAILOVER_SECONDS = 60.0  # for the partitions to have leaders again, after the fault
RECOVERY_SECONDS = 120.0  # for the node to start and its queue members to be online again
DELIVERY_SECONDS = 120.0  # for everything accepted to be delivered at the end
DRAIN_SECONDS = 60.0  # then for the partitions to hold nothing (every outcome recorded)
COMMAND_SECONDS = 150.0  # for one deploy/cluster.sh command
PLACEMENT_SECONDS = 30.0  # for new streams' replicas to show in the management API
QUIET_SECONDS = 3.0  # past its leader's committed offset, a stream read ends this long quiet
READ_SECONDS = 90.0  # for one stream's read
READ_PREFETCH = 1000  # a stream consumer needs one; its acks only grant credit
SKEW_SECONDS = 5.0  # an offset by time starts at a chunk: from a little before the run's start
PARTITION_SECONDS = 150.0  # for a cut-off node to be seen gone, and to pause (net_ticktime: 60)
# refusals (503s, errors) a node's restart may cause: while the ingress's connection to it closes
# and another opens, 20 invoices each sent again every 0.2 s
REFUSED_PER_RESTART = 200
COLUMNS = "name,type,leader,node,members,online,messages"
AUTH = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}


def node(i: int) -> str:
    return f"relay-c{i}@localhost"


def cluster(*args: str) -> str:
    """`deploy/cluster.sh ARGS`: its output; raises if it fails."""
    done = subprocess.run([str(CLUSTER), *args], capture_output=True, text=True,
                          timeout=COMMAND_SECONDS, check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"deploy/cluster.sh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


async def queues(up: list[int], names: list[str]) -> dict[str, dict[str, Any]]:
    """The named queues' leader, node, members and online members, from the management API of
    the first running node in `up` that answers. RabbitMQ 3.10.8 gives a stream no `leader`
    there: its `node` is its leader's; its `members` and `online` come only some seconds after
    it was declared."""
    for i in up:
        url = f"http://127.0.0.1:{15680 + i}/api/queues/%2F?columns={COLUMNS}"
        try:
            async with (
                aiohttp.ClientSession(headers=AUTH) as client,
                client.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response,
            ):
                if response.status == 200:
                    found = await response.json()
                    return {q["name"]: q for q in found if q["name"] in names}
        except (aiohttp.ClientError, TimeoutError):
            continue
    return {}


async def drained(up: list[int], partitions: list[str]) -> bool:
    """Whether the partitions hold no message, ready or unacknowledged (the management API's
    figures, sampled every few seconds)."""
    found = await queues(up, partitions)
    return len(found) == len(partitions) and all(q.get("messages") == 0 for q in found.values())


def replicated(found: dict[str, dict[str, Any]], names: list[str], online: bool = True) -> bool:
    """Every one of `names` has a member on every node (online on every node, if `online`)."""
    every = {node(i) for i in NODES}
    return len(found) == len(names) and all(
        set(q.get("members") or ()) == every and (not online or set(q.get("online") or ()) == every)
        for q in found.values()
    )


def placement(found: dict[str, dict[str, Any]]) -> str:
    """Each queue's leader (or, for a stream, its node) and members, short."""

    def short(name: str) -> str:
        return name.split("@")[0].removeprefix("relay-")

    return "; ".join(
        f"{name} led by {short(str(q.get('leader') or q.get('node')))} "
        f"members {','.join(sorted(short(m) for m in q.get('members') or ()))}"
        for name, q in sorted(found.items())
    )


async def run(args: argparse.Namespace) -> int:
    urls = cluster("urls").split(",")
    given = [f"{url}?heartbeat={args.heartbeat}" if args.heartbeat else url for url in urls]
    since = datetime.now(UTC)  # the run's start: its archive is read from here
    with tempfile.TemporaryDirectory(prefix="relay-cluster-run-") as directory:
        async with (
            HttpHandler() as handler,
            Relay(Path(directory), url=",".join(given), quiet=True) as relay,
        ):
            handler.latency = 0.005
            config = relay.config(
                {"name": "billing", "events": ["envoice.#"], "url": handler.url,
                 "partitions": 4, "backoff_initial_ms": 50, "backoff_max_ms": 1000}
            )  # fmt: skip
            billing = config.settings.handlers[0]
            partitions = list(billing.queues)
            streams = [topology.ARCHIVE, billing.outcome_log]
            # (debug: each worker logs the ids of every outcome-log write the broker confirmed)
            processes = await relay.start(config, workers=2, worker_args=("--log-level", "debug"))
            sender = EnvoiceSender.to(config, pause_seconds=0.01)
            stop = asyncio.Event()
            async with in_background(sender.send(INVOICES, stop=stop)):
                result = await fault(args, sender, partitions, streams, processes)
                stop.set()
            stopped = time.monotonic()
            try:
                # (the partitions read live on a running node: a repeat still on its way counts)
                on_node = (str(CLUSTER), "ctl", str(result["up"][0]))
                drained_now = PartitionsEmpty(
                    partitions, vhost=config.settings.broker.vhost, rabbitmqctl=on_node
                )
                await sender.ledger.delivered(
                    lambda: http_deliveries(handler), drained_now, timeout=DELIVERY_SECONDS
                )
            except AssertionError as undelivered:  # counted after the drain: the line says
                print(undelivered, file=sys.stderr)  # what is missing even then
            delivered_in = time.monotonic() - stopped
            # A message is acked only once its outcome record is confirmed (records the broker
            # did not confirm in the failover are written again): wait for the partitions to
            # hold nothing, then every delivered message has its record.
            try:
                await eventually(lambda: drained(result["up"], partitions), timeout=DRAIN_SECONDS,
                                 interval=1.0, what="the partitions drained")  # fmt: skip
            except AssertionError as undrained:
                print(undrained, file=sys.stderr)
            tally = sender.ledger.check(http_deliveries(handler))
            # the load has stopped and what could be delivered is: the streams are read to their end
            memory = await remembered(
                result["up"][0], urls, config.settings.broker.exchange, since,
                billing.outcome_log, sender.ledger, handler, processes[1:],
            )  # fmt: skip
    answers = dict(sender.answers.most_common())
    print(f"{tally.line()} failover_seconds={result['failover']:.1f} "
          f"recovered_seconds={result['recovered']:.1f} "
          f"accepted_after_fault={result['accepted_after']} fault={args.fault} "
          f"node={result['node']} streams_recovered_seconds={result['streams_recovered']:.1f} "
          f"{memory.line()} {result.get('extra', '')}delivered_in_seconds={delivered_in:.1f} "
          f"answers={answers}")  # fmt: skip
    for problem in (*tally.problems, *memory.problems, *result.get("problems", ())):
        print(f"  {problem}", file=sys.stderr)
    held = not result.get("problems")
    return 0 if tally.ok and memory.ok and held and result["accepted_after"] > 0 else 1


async def fault(
    args: argparse.Namespace,
    sender: EnvoiceSender,
    partitions: list[str],
    streams: list[str],
    processes: tuple[RelayProcess, ...],
) -> dict[str, Any]:
    """Under `sender`'s load: the fault on the node chosen by --victim (every node in turn, for
    `rolling`), the partitions' failover, the recovery of partitions and streams. What was
    measured."""
    await asyncio.sleep(args.warmup)  # the scenario's timeline: load before the fault
    await eventually(lambda: len(sender.ledger) > 0, timeout=FAILOVER_SECONDS, what="traffic")

    async def placed() -> dict[str, dict[str, Any]] | None:
        found = await queues(list(NODES), partitions + streams)
        return found if replicated(found, partitions + streams, online=False) else None

    what = "a member of every partition and stream on every node"
    found = await eventually(placed, timeout=PLACEMENT_SECONDS, interval=1.0, what=what)
    print(f"placed: {placement(found)}", flush=True)
    if args.fault == "rolling":
        return await rolling(args, sender, partitions, streams)
    if args.victim == "ingress":
        led = on_node(processes[0])
    elif args.victim == "partitions":
        leaders = Counter(found[q]["leader"] for q in partitions)
        led = leaders.most_common(1)[0][0]
    else:
        led = found[streams[0] if args.victim == "archive" else streams[1]]["node"]
    victim = next(i for i in NODES if node(i) == led)
    up = [i for i in NODES if i != victim]
    print(f"{args.fault} {node(victim)} (--victim {args.victim})", flush=True)
    if args.fault == "partition":
        return await partition(args, sender, partitions, streams, processes, victim)
    started = time.monotonic()
    if args.fault == "kill":
        base = Path(os.environ.get("RELAY_CLUSTER_DIR", "/tmp/relay-cluster"))
        pid = (base / f"c{victim}" / "pid").read_text().strip()
        os.kill(int(pid), signal.SIGKILL)
    else:
        await asyncio.to_thread(cluster, "ctl", str(victim), "stop_app")

    async def led_elsewhere() -> bool:
        found = await queues(up, partitions)
        return len(found) == len(partitions) and all(
            q["leader"] != node(victim) and q["leader"] in q["online"] for q in found.values()
        )

    await eventually(led_elsewhere, timeout=FAILOVER_SECONDS, what="partitions led elsewhere")
    failover = time.monotonic() - started
    accepted_at_fault = len(sender.ledger)
    print(
        f"failover in {failover:.1f} s; load on a 2-node cluster for {args.seconds:g} s", flush=True
    )
    await asyncio.sleep(args.seconds)  # the scenario's timeline: load on the degraded cluster
    accepted_after = len(sender.ledger) - accepted_at_fault

    started = time.monotonic()
    restart = ("boot", str(victim)) if args.fault == "kill" else ("ctl", str(victim), "start_app")
    await asyncio.to_thread(cluster, *restart)
    recovered, streams_recovered = await back_online(started, partitions, streams)
    print(f"{node(victim)} back, every partition's members online in {recovered:.1f} s, "
          f"every stream's replicas in {streams_recovered:.1f} s", flush=True)  # fmt: skip
    await asyncio.sleep(args.warmup)  # the scenario's timeline: load on the whole cluster again
    return {"node": node(victim), "up": up, "failover": failover, "recovered": recovered,
            "streams_recovered": streams_recovered, "accepted_after": accepted_after}  # fmt: skip


async def led_elsewhere(victim: int, partitions: list[str]) -> float:
    """Seconds until every partition has a leader online on a node other than `victim`."""
    started = time.monotonic()
    up = [i for i in NODES if i != victim]

    async def moved() -> bool:
        found = await queues(up, partitions)
        return len(found) == len(partitions) and all(
            q["leader"] != node(victim) and q["leader"] in q["online"] for q in found.values()
        )

    await eventually(moved, timeout=FAILOVER_SECONDS, what="partitions led elsewhere")
    return time.monotonic() - started


async def back_online(
    started: float, partitions: list[str], streams: list[str]
) -> tuple[float, float]:
    """Seconds since `started` until every partition has its three members online, and until
    every stream has its three replicas online."""

    async def all_online(names: list[str]) -> bool:
        return replicated(await queues(list(NODES), names), names)

    async def online_in(names: list[str], what: str) -> float:
        await eventually(lambda: all_online(names), timeout=RECOVERY_SECONDS, what=what)
        return time.monotonic() - started

    recovered, streams_recovered = await asyncio.gather(
        online_in(partitions, "every partition's members online again"),
        online_in(streams, "every stream's replicas online again"),
    )
    return recovered, streams_recovered


# --- a rolling restart ------------------------------------------------------------------------


async def rolling(
    args: argparse.Namespace, sender: EnvoiceSender, partitions: list[str], streams: list[str]
) -> dict[str, Any]:
    """Each node in turn, as an upgrade does: wait until stopping it leaves every quorum queue a
    majority (`rabbitmq-queues check_if_node_is_quorum_critical`), `stop_app`, --seconds down,
    `start_app`, wait until every partition's members and every stream's replicas are online
    again. The refusals (answers other than 200) in all: at most REFUSED_PER_RESTART a node."""
    started = time.monotonic()
    accepted_before = len(sender.ledger)
    rounds: list[dict[str, float]] = []
    for victim in NODES:

        def safe(victim: int = victim) -> bool:
            try:
                cluster("queues", str(victim), "check_if_node_is_quorum_critical")
            except RuntimeError:
                return False
            return True

        await eventually(lambda: asyncio.to_thread(safe), timeout=RECOVERY_SECONDS, interval=1.0,
                         what=f"{node(victim)} not quorum critical")  # fmt: skip
        stopped = time.monotonic()
        print(f"stop_app {node(victim)} (rolling)", flush=True)
        await asyncio.to_thread(cluster, "ctl", str(victim), "stop_app")
        failover = await led_elsewhere(victim, partitions)
        await asyncio.sleep(args.seconds)  # the scenario's timeline: this node down
        restarted = time.monotonic()
        await asyncio.to_thread(cluster, "ctl", str(victim), "start_app")
        recovered, streams_recovered = await back_online(restarted, partitions, streams)
        refused = sender.refused_in(stopped)
        rounds.append({"failover": failover, "recovered": recovered,
                       "streams_recovered": streams_recovered, "refused": refused})  # fmt: skip
        print(f"{node(victim)} restarted: failover {failover:.1f} s, partitions' members online "
              f"in {recovered:.1f} s, streams' replicas in {streams_recovered:.1f} s, "
              f"{refused} refused since its stop_app {dict(sender.count(stopped))}",
              flush=True)  # fmt: skip
        await asyncio.sleep(args.warmup)  # the scenario's timeline: the whole cluster, then next
    refused = sender.refused_in(started)
    bound = REFUSED_PER_RESTART * len(NODES)
    problems = [f"{refused} refusals in the rolling restart, more than {bound}"] * (refused > bound)
    return {
        "node": "each", "up": list(NODES), "accepted_after": len(sender.ledger) - accepted_before,
        "failover": max(r["failover"] for r in rounds),
        "recovered": max(r["recovered"] for r in rounds),
        "streams_recovered": max(r["streams_recovered"] for r in rounds),
        "extra": f"refused={refused} refused_bound={bound} rolling_seconds="
                 f"{time.monotonic() - started:.1f} ",
        "problems": problems,
    }  # fmt: skip


# --- a node cut off ---------------------------------------------------------------------------


def on_node(process: RelayProcess) -> str:
    """The node of `process`'s latest connection for its main work (the ingress's publisher, the
    worker's consumer), from its log's `broker connected`."""
    component = "publisher" if process.args[0] == "ingress" else "worker"
    made = [e for e in process.events("broker connected") if e.get("component") == component]
    return node((urlsplit(str(made[-1]["broker"])).port or 0) - 5680)


def connections(process: RelayProcess, since: datetime) -> list[tuple[float, str]]:
    """(seconds after `since`, "component event port") of `process`'s connections lost and made
    since."""
    found = []
    for event in ("broker connected", "broker connection lost", "broker unreachable"):
        for entry in process.events(event):
            at = datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00"))
            if at >= since:
                port = urlsplit(str(entry.get("broker", ""))).port or ""
                what = f"{entry.get('component')} {event} {port}".strip()
                found.append(((at - since).total_seconds(), what))
    return sorted(found)


async def partition(
    args: argparse.Namespace,
    sender: EnvoiceSender,
    partitions: list[str],
    streams: list[str],
    processes: tuple[RelayProcess, ...],
    victim: int,
) -> dict[str, Any]:
    """Node `victim` cut off (`deploy/cluster.sh cut`) until the other two see it gone and it
    paused itself (pause_minority), then --seconds more, under load; healed (in any case), and
    recovered. What the clients saw: their connections lost and made again (their logs), the
    refusals and the longest time without an accept while cut off."""
    up = [i for i in NODES if i != victim]
    where = {p.args[0] + str(n): on_node(p) for n, p in enumerate(processes)}
    print(f"relay's connections before the cut: {where}", flush=True)
    cut_at, started = datetime.now(UTC), time.monotonic()
    accepted_at_cut = len(sender.ledger)

    def asked(i: int, expression: str) -> str:
        try:
            return cluster("ctl", str(i), "-q", "eval", expression)
        except (RuntimeError, subprocess.TimeoutExpired):
            return ""

    def seen_gone() -> bool:
        running = asked(up[0], "rabbit_nodes:all_running().")
        return bool(running) and node(victim) not in running

    def paused() -> bool:  # (rabbitmqctl's own connection to the node is not cut)
        return asked(victim, "rabbit:is_running().") == "false"

    try:
        await asyncio.to_thread(cluster, "cut", str(victim))
        await eventually(lambda: asyncio.to_thread(seen_gone), timeout=PARTITION_SECONDS,
                         interval=1.0, what=f"{node(victim)} seen gone")  # fmt: skip
        detected = time.monotonic() - started
        await eventually(lambda: asyncio.to_thread(paused), timeout=PARTITION_SECONDS,
                         interval=1.0, what=f"{node(victim)} paused")  # fmt: skip
        paused_after = time.monotonic() - started
        print(
            f"{node(victim)} seen gone by {node(up[0])} after {detected:.1f} s, paused itself "
            f"after {paused_after:.1f} s; cut off {args.seconds:g} s more",
            flush=True,
        )
        await asyncio.sleep(args.seconds)  # the scenario's timeline: load while it is cut off
    finally:
        await asyncio.to_thread(cluster, "heal")
    healed = time.monotonic()
    accepted_after = len(sender.ledger) - accepted_at_cut
    recovered, streams_recovered = await back_online(healed, partitions, streams)
    print(f"{node(victim)} healed, every partition's members online in {recovered:.1f} s, "
          f"every stream's replicas in {streams_recovered:.1f} s", flush=True)  # fmt: skip
    await asyncio.sleep(args.warmup)  # the scenario's timeline: load on the whole cluster again
    accepts = [at for at, answer in sender.timeline if started <= at < healed and
               answer.startswith("200")]  # fmt: skip
    stall = max(b - a for a, b in zip([started, *accepts], [*accepts, healed], strict=True))
    moved = {
        name: [f"{at:.1f}s {what}" for at, what in connections(p, cut_at)]
        for name, p in zip(where, processes, strict=True)
    }
    print(f"relay's connections since the cut: {moved}", flush=True)
    cut_seconds = healed - started
    # when the ingress's publisher was connected again, to a node not cut off: how long a client
    # of the cut-off node took to notice (its AMQP heartbeat) and move
    again = [at for at, what in connections(processes[0], cut_at)
             if what == f"publisher broker connected {5680 + up[0]}"
             or what == f"publisher broker connected {5680 + up[1]}"]  # fmt: skip
    ingress_moved = f"{again[0]:.1f}" if again else "never"
    return {
        "node": node(victim), "up": up, "failover": detected, "recovered": recovered,
        "streams_recovered": streams_recovered, "accepted_after": accepted_after,
        "extra": f"detected_seconds={detected:.1f} paused_seconds={paused_after:.1f} "
                 f"cut_seconds={cut_seconds:.1f} "
                 f"refused_while_cut={sender.refused_in(started, healed)} "
                 f"longest_without_accept_seconds={stall:.1f} "
                 f"ingress_moved_seconds={ingress_moved} ",
    }  # fmt: skip


# --- what the streams remember ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Memory:
    """The archive and the outcome log, counted against what was accepted and delivered."""

    archived: int  # accepted ids in the archive
    archive_lost: int  # accepted ids not in the archive
    archive_reordered: int  # keys whose first archived copies are not in acceptance order
    outcomes: int  # ids the handler answered 2xx that have a `delivered` record
    outcomes_lost: int  # ids the handler answered 2xx without one (less those below)
    outcome_duplicates: int  # `delivered` records beyond the first of an id (informational)
    # ids 2xx without a record whose record the broker confirmed to a worker and no node's
    # replica holds: RabbitMQ 3.10.8 losing confirmed stream writes in a failover (reported, not
    # failed: relay acked on the broker's confirm; a repeat of such an id is delivered again)
    outcomes_dropped_by_broker: int = 0
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.archive_lost == 0 and self.outcomes_lost == 0

    def line(self) -> str:
        return (
            f"archived={self.archived} archive_lost={self.archive_lost} "
            f"archive_reordered={self.archive_reordered} outcomes={self.outcomes} "
            f"outcomes_lost={self.outcomes_lost} outcome_duplicates={self.outcome_duplicates} "
            f"outcomes_dropped_by_broker={self.outcomes_dropped_by_broker}"
        )


async def remembered(
    survivor: int,
    urls: list[str],
    exchange: str,
    since: datetime,
    outcome_log: str,
    ledger: Ledger,
    handler: HttpHandler,
    workers: Sequence[RelayProcess],
) -> Memory:
    """Read from node `survivor` the archive's messages of `exchange` from `since` on, and the
    outcome log, each up to its leader's committed offset; count them against `ledger` and what
    `handler` answered 2xx."""
    problems: list[str] = []
    connection = await aio_pika.connect(urls[survivor - 1], timeout=10)
    async with connection:
        read: dict[str, list[DeliveredMessage]] = {}
        for stream, offset in (
            (topology.ARCHIVE, since - timedelta(seconds=SKEW_SECONDS)),
            (outcome_log, "first"),
        ):
            end = await committed(survivor, stream)
            read[stream], last = await read_stream(connection, stream, offset, end)
            if last < end:
                problems.append(
                    f"{stream} read on {node(survivor)} up to offset {last} only, of the "
                    f"{end} its leader had committed, within {READ_SECONDS:g} s"
                )
    archive, outcome_messages = read[topology.ARCHIVE], read[outcome_log]
    archived = [
        (wire.key_of(m.header.properties), m.header.properties.message_id or "")
        for m in archive
        if cast(Basic.Deliver, m.delivery).exchange == exchange
        and not wire.is_marker(m.header.properties)
    ]
    in_archive = ledger.check(archived)  # "delivered" here: present in the archive
    records = [r for m in outcome_messages for r in wire.read_outcomes(m.body)]
    recorded = Counter(str(r["id"]) for r in records if r["outcome"] == wire.DELIVERED)
    delivered = set(handler.accepted())
    unrecorded = sorted(delivered - recorded.keys())
    dropped: set[str] = set()
    problems += [f"archive {p.replace(', delivered ', ', archived ')}" for p in in_archive.problems]
    if unrecorded:
        more = " ..." if len(unrecorded) > 5 else ""
        problems.append(f"delivered without an outcome record: {', '.join(unrecorded[:5])}{more}")
        missing = set(unrecorded)
        others = Counter(str(r["outcome"]) for r in records if str(r["id"]) in missing)
        accepted = sum(1 for ids in ledger.accepted.values() for i in ids if i in missing)
        problems.append(f"  of those {len(missing)}: {accepted} accepted by the ingress; their "
                        f"other records in the log: {dict(others)}")  # fmt: skip
        # confirmed by the broker (then lost by it), or acked by relay without a confirm?
        confirmed_ids: set[str] = set()
        confirmed = []
        for w in workers:
            for event in w.events("outcome records confirmed"):
                if ids := missing & {str(i) for i in event.get("ids", ())}:
                    confirmed_ids |= ids
                    confirmed.append((str(event["timestamp"]), w.process.pid, len(ids)))
        problems.append(f"  the broker confirmed {len(confirmed_ids)} of their records to a "
                        f"worker (when, worker, ids): {confirmed or 'never'}")  # fmt: skip
        # the survivor's replica behind, or the records gone from every replica (the broker)?
        held: set[str] = set()
        for i in (n for n in NODES if n != survivor):
            said, found = await recorded_on(i, urls[i - 1], outcome_log, missing)
            problems.append(f"  {said}")
            held |= found if found is not None else missing  # not read: cannot rule it out
        dropped = confirmed_ids - held  # confirmed, and on no replica: the broker lost them
    return Memory(
        archived=in_archive.delivered,
        archive_lost=in_archive.lost,
        archive_reordered=in_archive.reordered,
        outcomes=len(delivered & recorded.keys()),
        outcomes_lost=len(unrecorded) - len(dropped),
        outcome_duplicates=sum(n - 1 for n in recorded.values()),
        outcomes_dropped_by_broker=len(dropped),
        problems=tuple(problems),
    )


async def recorded_on(
    i: int, url: str, outcome_log: str, ids: set[str]
) -> tuple[str, set[str] | None]:
    """Which of `ids` have a record in node `i`'s replica of the outcome log, read whole (None:
    not read), and that said in words."""
    try:
        end = await committed(i, outcome_log)
        connection = await aio_pika.connect(url, timeout=10)
        async with connection:
            messages, last = await read_stream(connection, outcome_log, "first", end)
    except (AssertionError, *BROKER_ERRORS) as exc:
        return f"{node(i)}: not read ({exc!r})", None
    found = {str(r["id"]) for m in messages for r in wire.read_outcomes(m.body)} & ids
    return f"{node(i)}: {len(found)} of them recorded (read to offset {last} of {end})", found


async def committed(i: int, stream: str) -> int:
    """The last offset `stream`'s leader has committed (-1: none yet), as node `i` tells
    (`rabbitmq-queues stream_status`: asking writes nothing into the stream)."""

    async def writer() -> tuple[int] | None:
        try:
            status = await asyncio.to_thread(
                cluster, "queues", str(i), "stream_status", stream, "--formatter", "json"
            )
            members = json.loads(status)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError):
            return None
        leaders = [m for m in members if m.get("role") == "writer"]
        return (int(leaders[0]["committed_offset"]),) if leaders else None

    found: tuple[int] = await eventually(
        writer, timeout=READ_SECONDS, interval=1.0, what=f"{stream}'s leader"
    )
    return found[0]


async def read_stream(
    connection: AbstractConnection, stream: str, offset: datetime | str, end: int
) -> tuple[list[DeliveredMessage], int]:
    """`stream`'s messages from `offset` on, in stream order, and the last one's offset: read
    until the one at offset `end` came (the node's replica may still be catching up), then
    until none came for QUIET_SECONDS (called once the load has stopped: nothing more is
    written), or READ_SECONDS passed. A check writes nothing into a stream: no marker of its
    own to read up to (tests/test_streams.py)."""
    channel = await connection.channel(publisher_confirms=False)
    async with channel:
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=READ_PREFETCH)
        arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        # each delivery is put from a task of its own, started in order: the queue keeps it
        await raw.basic_consume(stream, arrived.put, arguments={"x-stream-offset": offset})
        got: list[DeliveredMessage] = []
        last = -1
        deadline = time.monotonic() + READ_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(
                    arrived.get(), min(left, QUIET_SECONDS) if last >= end else left
                )
            except TimeoutError:
                if last >= end:
                    break
                continue
            got.append(message)
            last = int(str((message.header.properties.headers or {})["x-stream-offset"]))
            if len(got) % (READ_PREFETCH // 2) == 0:  # credit for the next ones
                tag = cast(Basic.Deliver, message.delivery).delivery_tag
                await raw.basic_ack(cast(int, tag), multiple=True)
    return got, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load with a node down (60)")
    parser.add_argument("--warmup", type=float, default=10.0, help="load before and after (10)")
    parser.add_argument(
        "--fault", choices=["stop_app", "kill", "rolling", "partition"], default="stop_app",
        help="stop_app, kill -9, every node restarted in turn (--seconds down each), "
             "or cut off (--seconds once it paused itself)",
    )  # fmt: skip
    parser.add_argument(
        "--victim", choices=["partitions", "archive", "outcomes", "ingress"], default="partitions",
        help="the node leading the most partitions (default), the archive, the outcome log, "
             "or the ingress's connection",
    )  # fmt: skip
    parser.add_argument(
        "--heartbeat", type=int, default=0,
        help="AMQP heartbeat (s) in the URLs relay is given (?heartbeat=N); 0: relay's default",
    )  # fmt: skip
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
