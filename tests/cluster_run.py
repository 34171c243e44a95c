"""relay on a three-node RabbitMQ cluster while a node dies; `deploy/cluster.sh run` runs it.

Needs the cluster of deploy/cluster.sh (`deploy/cluster.sh start`). Starts `relay ingress` and
two `relay worker`s given every node's address (broker.url as a list, here through
$RELAY_AMQP_URL), an HTTP handler with 4 partitions, and a provider sending 20 invoices at once,
each invoice's webhooks one after the other, every 503 sent again.

After --warmup seconds it stops (`stop_app`) or kills (-9) the node leading the most of the
handler's partitions, under load; measures how long until every partition has a leader on a
running node again (`failover_seconds`); keeps the load on for --seconds; starts the node again
and measures how long until every partition has its three members online (`recovered_seconds`);
keeps the load on for --warmup more seconds, stops it, waits for everything accepted to be
delivered and prints one line:

    accepted=... delivered=... lost=0 reordered=0 duplicates=... failover_seconds=...

Exit 0 only if nothing accepted was lost or reordered, load was accepted after the fault, and
the queues recovered. Every wait has a deadline.

    deploy/cluster.sh run --seconds 60 --fault kill
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from tests.handlers_for_tests import HttpHandler
from tests.processes import EnvoiceSender, Relay, http_deliveries, in_background
from tests.support import ROOT, eventually

CLUSTER = ROOT / "deploy" / "cluster.sh"
NODES = (1, 2, 3)
INVOICES = range(1, 21)
FAILOVER_SECONDS = 60.0  # for the partitions to have leaders again, after the fault
RECOVERY_SECONDS = 120.0  # for the node to start and its queue members to be online again
DELIVERY_SECONDS = 120.0  # for everything accepted to be delivered at the end
COMMAND_SECONDS = 150.0  # for one deploy/cluster.sh command
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
    """The named queues' leader, members and online members, from the management API of the
    first running node in `up` that answers."""
    for i in up:
        url = f"http://127.0.0.1:{15680 + i}/api/queues/%2F?columns=name,leader,members,online"
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


async def run(args: argparse.Namespace) -> int:
    urls = cluster("urls").split(",")
    with tempfile.TemporaryDirectory(prefix="relay-cluster-run-") as directory:
        async with (
            HttpHandler() as handler,
            Relay(Path(directory), url=",".join(urls), quiet=True) as relay,
        ):
            handler.latency = 0.005
            config = relay.config(
                {"name": "billing", "events": ["envoice.#"], "url": handler.url,
                 "partitions": 4, "backoff_initial_ms": 50, "backoff_max_ms": 1000}
            )  # fmt: skip
            partitions = list(config.settings.handlers[0].queues)
            await relay.start(config, workers=2)
            sender = EnvoiceSender.to(config, pause_seconds=0.01)
            stop = asyncio.Event()
            async with in_background(sender.send(INVOICES, stop=stop)):
                result = await fault(args, sender, partitions)
                stop.set()
            tally = sender.ledger.check(http_deliveries(handler))
            if tally.lost:
                tally = await sender.ledger.delivered(
                    lambda: http_deliveries(handler), timeout=DELIVERY_SECONDS
                )
    answers = dict(sender.answers.most_common())
    print(f"{tally.line()} failover_seconds={result['failover']:.1f} "
          f"recovered_seconds={result['recovered']:.1f} "
          f"accepted_after_fault={result['accepted_after']} fault={args.fault} "
          f"node={result['node']} answers={answers}")  # fmt: skip
    for problem in tally.problems:
        print(f"  {problem}", file=sys.stderr)
    return 0 if tally.ok and result["accepted_after"] > 0 else 1


async def fault(
    args: argparse.Namespace, sender: EnvoiceSender, partitions: list[str]
) -> dict[str, Any]:
    """Under `sender`'s load: the fault on the node leading most partitions, its failover, its
    recovery. What was measured."""
    await asyncio.sleep(args.warmup)  # the scenario's timeline: load before the fault
    await eventually(lambda: len(sender.ledger) > 0, timeout=FAILOVER_SECONDS, what="traffic")
    leaders = Counter(q["leader"] for q in (await queues(list(NODES), partitions)).values())
    victim = next(i for i in NODES if node(i) == leaders.most_common(1)[0][0])
    up = [i for i in NODES if i != victim]
    print(f"partition leaders {dict(leaders)}: {args.fault} {node(victim)}", flush=True)
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

    async def all_online() -> bool:
        found = await queues(list(NODES), partitions)
        return len(found) == len(partitions) and all(
            len(q["online"]) == len(NODES) for q in found.values()
        )

    await eventually(all_online, timeout=RECOVERY_SECONDS, what="every member online again")
    recovered = time.monotonic() - started
    print(f"{node(victim)} back, every partition's members online in {recovered:.1f} s", flush=True)
    await asyncio.sleep(args.warmup)  # the scenario's timeline: load on the whole cluster again
    return {"node": node(victim), "failover": failover, "recovered": recovered,
            "accepted_after": accepted_after}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load with a node down (60)")
    parser.add_argument("--warmup", type=float, default=10.0, help="load before and after (10)")
    parser.add_argument("--fault", choices=["stop_app", "kill"], default="stop_app")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
