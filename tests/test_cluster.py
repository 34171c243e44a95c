"""relay given several nodes' addresses: it moves to the next when one is lost; and on a real
three-node RabbitMQ cluster (deploy/cluster.sh) while a node dies, a short run of
tests/cluster_run.py. That one needs about 1 GB of memory for the three nodes and two free
minutes; deselect it with `-m "not cluster"` where they do not fit. A rolling restart and a node
cut off (iptables: root and cgroup v2) take about 8 minutes each: they run with --long."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator
from typing import cast

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from relay.broker import keep_connected
from tests.support import ROOT, TcpProxy, eventually

pytestmark = pytest.mark.rabbit

RUN_SECONDS = 420  # the cluster's start and stop, a 10 s fault run and its waits


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    """Two addresses of the broker, each a proxy a test can cut: two nodes, as relay sees them."""
    proxies = (TcpProxy(), TcpProxy())
    for proxy in proxies:
        await proxy.start()
    yield proxies
    for proxy in proxies:
        await proxy.cut()


@pytest.mark.timeout(30)
async def test_a_lost_node_is_replaced_by_the_next_at_once(
    nodes: tuple[TcpProxy, TcpProxy],
) -> None:
    connected: list[int] = []  # the port of each connection, in turn

    async def session(connection: AbstractConnection, over: asyncio.Event) -> None:
        connected.append(cast(aio_pika.Connection, connection).url.port or 0)
        await over.wait()

    urls = [proxy.url() for proxy in nodes]
    running = asyncio.create_task(keep_connected(urls, session, what="test"))
    try:
        await eventually(lambda: len(connected) == 1, timeout=10, what="connected")
        first = next(p for p in nodes if p.port == connected[0])
        other = next(p for p in nodes if p is not first)

        await first.cut()  # the node is gone: its port refuses, its connections drop

        await eventually(lambda: len(connected) == 2, timeout=10, what="connected again")
        assert connected[1] == other.port
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


@pytest.mark.fault
@pytest.mark.cluster
@pytest.mark.timeout(RUN_SECONDS + 60)
def test_a_killed_node_loses_and_reorders_nothing_and_its_queues_recover() -> None:
    done = cluster_run("--seconds", "10", "--warmup", "5", "--fault", "kill", timeout=RUN_SECONDS)

    assert done.returncode == 0
    found = re.search(
        r"accepted=(\d+) delivered=(\d+) lost=(\d+) reordered=(\d+) duplicates=(\d+) "
        r"late_repeats=\d+ failover_seconds=([\d.]+) recovered_seconds=([\d.]+) "
        r"accepted_after_fault=(\d+)",
        done.stdout,
    )
    assert found is not None
    accepted, delivered, lost, reordered, duplicates = (int(g) for g in found.groups()[:5])
    assert accepted > 0
    assert delivered == accepted
    assert (lost, reordered) == (0, 0)
    # a repeat at most of what was in flight (one webhook per invoice: 20) on each of the two
    # workers' connections to the killed node
    assert duplicates <= 2 * 20
    assert int(found[8]) > 0  # webhooks were accepted while the node was down
    # the archive and the outcome log, read from a node that stayed up, miss nothing, and each
    # stream had its replicas on all three nodes again after the restart
    memory = re.search(
        r"streams_recovered_seconds=[\d.]+ archived=(\d+) archive_lost=(\d+) "
        r"archive_reordered=(\d+) outcomes=\d+ outcomes_lost=(\d+) outcome_duplicates=\d+ ",
        done.stdout,
    )
    assert memory is not None
    archived, archive_lost, archive_reordered, outcomes_lost = map(int, memory.groups())
    assert (archived, archive_lost, archive_reordered) == (accepted, 0, 0)
    assert outcomes_lost == 0


ROLLING_SECONDS = 900  # the cluster's start and stop, three restarts of 10 s each and their waits


@pytest.mark.fault
@pytest.mark.cluster
@pytest.mark.long
@pytest.mark.timeout(ROLLING_SECONDS + 60)
def test_a_rolling_restart_under_load_loses_and_reorders_nothing_and_refuses_little() -> None:
    # Given relay (ingress and two workers given all three nodes) under a provider's load
    # When each node in turn is stopped (stop_app) for 10 s, started, and its queues and streams
    # are back in sync before the next
    done = cluster_run(
        "--seconds", "10", "--warmup", "10", "--fault", "rolling", timeout=ROLLING_SECONDS
    )

    # Then everything accepted was delivered once at least, in order, and archived
    assert done.returncode == 0
    accepted, delivered, lost, reordered, duplicates = counted(done.stdout)
    assert accepted > 0
    assert delivered == accepted
    assert (lost, reordered) == (0, 0)
    # a repeat at most of what was in flight (20) on each worker's connection, at each restart
    assert duplicates <= 3 * 2 * 20
    # and the provider was refused (503) at most refused_bound times: 200 a restart, what the
    # 20 invoices sent again every 0.2 s meet in 2 s without an ingress connection
    found = re.search(r"refused=(\d+) refused_bound=(\d+) ", done.stdout)
    assert found is not None
    refused, bound = int(found[1]), int(found[2])
    assert bound == 3 * 200
    assert refused <= bound


PARTITION_SECONDS = 600  # the cluster's start and stop, the cut seen (net_ticktime 60), 30 s more


@pytest.mark.fault
@pytest.mark.cluster
@pytest.mark.long
@pytest.mark.timeout(PARTITION_SECONDS + 60)
def test_a_node_cut_off_pauses_and_loses_and_reorders_nothing() -> None:
    # Given relay under load, its ingress connected to the node about to be cut off, with
    # relay's default AMQP heartbeat (broker.heartbeat_seconds, 10 s)
    # When that node's inter-node and client traffic is dropped until the others see it gone and
    # it paused itself (pause_minority), 30 s more, and then the cut is healed
    done = cluster_run(
        "--seconds",
        "30",
        "--warmup",
        "10",
        "--fault",
        "partition",
        "--victim",
        "ingress",
        timeout=PARTITION_SECONDS,
    )

    # Then everything accepted was delivered, in order, and archived; the node paused itself
    # and came back; the provider waited no longer than until the others saw the node gone (the
    # queues it led then elect a leader among them) and a publish timeout more
    assert done.returncode == 0
    accepted, delivered, lost, reordered, _ = counted(done.stdout)
    assert accepted > 0
    assert delivered == accepted
    assert (lost, reordered) == (0, 0)
    found = re.search(
        r"detected_seconds=([\d.]+) paused_seconds=([\d.]+) cut_seconds=([\d.]+) "
        r"refused_while_cut=(\d+) longest_without_accept_seconds=([\d.]+) ",
        done.stdout,
    )
    assert found is not None
    detected, longest = float(found[1]), float(found[5])
    assert longest < detected + 5 + 10  # the publish timeout, and an election's time
    # and the ingress left the cut-off node once its heartbeat missed: within 3 x (10 + 1) s,
    # and a reconnect (not RabbitMQ's 60 s heartbeat's 3 minutes)
    moved = re.search(r"ingress_moved_seconds=([\d.]+) ", done.stdout)
    assert moved is not None
    assert float(moved[1]) < 3 * (10 + 1) + 10


def cluster_run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`deploy/cluster.sh run ARGS`, its output printed (shown with -rP, and when a test fails)."""
    done = subprocess.run(
        [str(ROOT / "deploy" / "cluster.sh"), "run", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    print(done.stdout, done.stderr)
    return done


def counted(stdout: str) -> tuple[int, int, int, int, int]:
    """accepted, delivered, lost, reordered, duplicates of a cluster run's line."""
    found = re.search(
        r"accepted=(\d+) delivered=(\d+) lost=(\d+) reordered=(\d+) duplicates=(\d+) ", stdout
    )
    assert found is not None
    accepted, delivered, lost, reordered, duplicates = (int(g) for g in found.groups())
    return accepted, delivered, lost, reordered, duplicates
