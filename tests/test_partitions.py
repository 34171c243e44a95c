"""Routing that cannot drift: one bucket rule shared by every process, `relay topology declare`
converging the broker on the config, and `relay status` telling the truth.

The first two tests reproduce what went wrong when each process derived partition headers from
its own config: webhooks silently lost for a handler the ingress did not know, and keys
delivered twice after a partition count changed.
"""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from relay import topology, wire
from relay.broker import exchange_exists
from relay.config import from_dict as config_from_dict
from relay.config import load as load_config
from relay.ops.management import Management
from relay.ops.topology import BrokerState, QueueState, plan, plan_lines
from relay.settings import Settings
from tests.conftest import delete_topology, settings_dict
from tests.handlers_for_tests import Held, HttpHandler
from tests.processes import (
    Config,
    EnvoiceSender,
    Relay,
    RelayProcess,
    free_port,
    http_deliveries,
    ingress_ready,
    partitions_empty,
    write_config,
)
from tests.support import eventually, queue_depth, run_relay, toml

# --- the plan, without a broker -----------------------------------------------------------------


def settings_with(**handler: Any) -> Settings:
    base = {"name": "h", "events": ["envoice.paid"], "url": "http://127.0.0.1:9/"}
    raw = settings_dict("plan", handlers=[{**base, **handler}])
    raw["handlers"][0]["name"] = "h"
    return config_from_dict(raw)


def on_broker(settings: Settings, **extra_queues: int) -> BrokerState:
    """A broker holding exactly what `settings` plan_lines, plus queues with message counts."""
    described = topology.describe(settings)
    queues = {
        q.name: QueueState(q.name, 0, 0, q.arguments.get("x-queue-type", "classic"), q.arguments)
        for q in described.queues
    }
    queues.update({name: QueueState(name, n, 0) for name, n in extra_queues.items()})
    return BrokerState({e.name: e.type for e in described.exchanges}, queues, described.bindings)


def test_nothing_to_do_when_the_broker_matches_the_config() -> None:
    settings = settings_with(partitions=4)

    changes = plan(topology.describe(settings), on_broker(settings), settings.broker.exchange)

    assert changes.empty
    assert plan_lines(changes, prune=False) == []


def test_a_partition_change_moves_buckets_and_keeps_the_queues_it_no_longer_uses() -> None:
    before, after = settings_with(partitions=4), settings_with(partitions=2)
    broker = on_broker(before)

    changes = plan(topology.describe(after), broker, after.broker.exchange)

    # buckets of partitions 2 and 3 go to 0 and 1, and nothing else changes
    moved = {(b.destination, b.arguments["relay-bucket"]) for b in changes.declare.bindings}
    assert moved == {(f"relay.h.{b % 2}", str(b)) for b in range(wire.BUCKETS) if b % 4 >= 2}
    unbound = {(b.destination, b.arguments["relay-bucket"]) for b in changes.unbind}
    assert unbound == {(f"relay.h.{b % 4}", str(b)) for b in range(wire.BUCKETS) if b % 4 >= 2}
    assert not changes.declare.queues
    assert [q.name for q in changes.leftovers] == ["relay.h.2", "relay.h.3"]
    [move] = changes.moves
    assert move.gains == {
        "relay.h.0": list(range(2, 64, 4)),
        "relay.h.1": list(range(3, 64, 4)),
    }
    assert move.losses == {
        "relay.h.2": list(range(2, 64, 4)),
        "relay.h.3": list(range(3, 64, 4)),
    }
    assert move.partitions == 4  # queues 2 and 3 still hold messages to consume
    assert plan_lines(changes, prune=False) == [
        "+ bind relay.h -> relay.h.0 buckets " + " ".join(str(b) for b in range(2, 64, 4)),
        "+ bind relay.h -> relay.h.1 buckets " + " ".join(str(b) for b in range(3, 64, 4)),
        "- bind relay.h -> relay.h.2 buckets " + " ".join(str(b) for b in range(2, 64, 4)),
        "- bind relay.h -> relay.h.3 buckets " + " ".join(str(b) for b in range(3, 64, 4)),
        "~ 32 bucket(s) of relay.h change partition: each new partition holds them until the "
        "old one has delivered what it has of them",
        "= queue relay.h.2 is no longer used: 0 message(s), 0 consumer(s); "
        "`relay topology declare --prune` removes it once empty",
        "= queue relay.h.3 is no longer used: 0 message(s), 0 consumer(s); "
        "`relay topology declare --prune` removes it once empty",
    ]


def test_a_classic_dead_letter_queue_is_converted_once_no_worker_consumes() -> None:
    settings = settings_with(partitions=2)
    broker = on_broker(settings)
    broker.queues["relay.h.dlq"] = QueueState("relay.h.dlq", 3, 0, "classic")  # an older relay's

    idle = plan(topology.describe(settings), broker, settings.broker.exchange)
    broker.queues["relay.h.1"] = QueueState("relay.h.1", 0, 2, "quorum")
    busy = plan(topology.describe(settings), broker, settings.broker.exchange)

    assert [(c.queue, c.type, c.busy, c.old) for c in idle.convert] == [
        ("relay.h.dlq", "quorum", 0, True)
    ]
    assert not idle.declare.queues  # it is converted, not declared
    assert plan_lines(idle, prune=False) == [
        "~ queue relay.h.dlq becomes a quorum queue, its messages moved in order"
    ]
    assert plan_lines(busy, prune=False) == [
        "= queue relay.h.dlq stays as it is until it can become a quorum queue: stop the workers "
        "of its handler (2 consumer(s) on its partitions), then run `relay topology declare` again"
    ]


def test_a_leftover_holding_messages_is_never_pruned() -> None:
    settings = settings_with(partitions=1)
    broker = on_broker(settings, **{"relay.h.1": 7, "relay.h.2": 0})

    changes = plan(topology.describe(settings), broker, settings.broker.exchange)

    lines = plan_lines(changes, prune=True)
    assert "- queue relay.h.2 (empty)" in lines
    assert any(
        line.startswith("= queue relay.h.1 is no longer used: 7 message(s)") for line in lines
    )


def test_a_removed_pattern_is_unbound() -> None:
    old, new = settings_with(events=["envoice.paid", "envoice.overdue"]), settings_with()

    changes = plan(topology.describe(new), on_broker(old), new.broker.exchange)

    assert [(b.destination, b.routing_key) for b in changes.unbind] == [
        ("relay.h", "envoice.overdue")
    ]
    assert plan_lines(changes, prune=False) == [
        f"- bind {new.broker.exchange} -> relay.h on 'envoice.overdue'"
    ]


def test_legacy_partition_bindings_stay_until_pruned() -> None:
    settings = settings_with(partitions=2)
    broker = on_broker(settings)
    legacy = topology.Binding(
        "relay.h", "relay.h.0", "queue", "", {"x-match": "all", "relay-p2": "0"}
    )
    broker.bindings.append(legacy)

    changes = plan(topology.describe(settings), broker, settings.broker.exchange)

    assert changes.legacy == [legacy]
    assert not changes.unbind
    assert plan_lines(changes, prune=False) == [
        "= 1 legacy relay-p<N> binding(s) kept for ingresses older than buckets: "
        "--prune removes them"
    ]


def test_another_deployments_objects_are_not_touched() -> None:
    settings = settings_with()
    broker = on_broker(settings)
    # Given another deployment's handler on the same broker (another main exchange)
    foreign = topology.Binding(
        "relay.other", "relay.other.0", "queue", "", {"x-match": "all", "relay-bucket": "1"}
    )
    broker.bindings.append(foreign)
    broker.bindings.append(topology.Binding("relay.theirs", "relay.other", "exchange", "#"))
    broker.queues["relay.other.0"] = QueueState("relay.other.0", 3, 1)

    changes = plan(topology.describe(settings), broker, settings.broker.exchange)

    assert changes.empty
    assert not changes.leftovers


# --- against the broker -------------------------------------------------------------------------


def handler_config(url: str, **options: Any) -> dict[str, Any]:
    return {"name": "h", "events": ["envoice.#"], "url": url, "partitions": 1,
            "backoff_initial_ms": 20, "backoff_max_ms": 200, **options}  # fmt: skip


def shared_exchange(
    relay: Relay,
    *handlers: dict[str, Any],
    exchange: str,
    archive: dict[str, Any] | None = None,
) -> Config:
    """A config of `relay` whose main exchange is `exchange` (shared with another config)."""
    path = relay.directory / f"relay-{len(relay.configs)}.toml"
    broker = {"exchange": exchange}
    relay.configs.append(
        write_config(path, *handlers, url=relay.url, broker=broker, archive=archive or {})
    )
    return relay.configs[-1]


def changed(relay: Relay, config: Config, handler: int, **options: Any) -> Config:
    """A copy of `config` with options of one handler changed: the same deployment, edited."""
    raw = tomllib.loads(config.path.read_text())
    raw["handlers"][handler].update(options)
    path = relay.directory / f"relay-{len(relay.configs)}.toml"
    path.write_text(toml(raw))
    relay.configs.append(Config(path, load_config(path)))
    return relay.configs[-1]


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_an_ingress_without_the_handler_feeds_a_handler_added_later(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given an ingress whose config knows other handlers (2 and 4 partitions) or none
        ingress_config = relay.config(
            handler_config("http://127.0.0.1:9/", name="a", partitions=2),
            handler_config("http://127.0.0.1:9/", name="b", partitions=4),
        )
        exchange = ingress_config.settings.broker.exchange
        await relay.run("ingress", config=ingress_config)
        # and workers given a new handler with 3 partitions
        worker_config = shared_exchange(
            relay, handler_config(http_handler.url, partitions=3), exchange=exchange
        )
        await relay.worker(worker_config)

        # When webhooks arrive at the ingress, which was never told of the new handler
        sender = EnvoiceSender.to(ingress_config)
        await asyncio.wait_for(sender.send(range(1, 11), each=1), 60)

        # Then the new handler gets every one, once
        tally = await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), worker_config.settings, timeout=30
        )
    assert tally.accepted == 10
    assert tally.ok, tally
    assert tally.duplicates == 0


async def unrouted_depth(config: Config) -> int:
    connection = await aio_pika.connect(config.settings.broker.url)
    async with connection:
        return await queue_depth(await connection.channel(), topology.UNROUTED)


async def partitions_depth(config: Config) -> int:
    connection = await aio_pika.connect(config.settings.broker.url)
    async with connection:
        channel = await connection.channel()
        return sum([await queue_depth(channel, q) for q in config.settings.handlers[0].queues])


def test_a_handlers_bindings_are_declared_bottom_up() -> None:
    settings = settings_with(partitions=4)

    bindings = topology.handler(settings, settings.handlers[0]).bindings

    # every bucket finds its partition before the first pattern routes anything to them
    patterns = [n for n, b in enumerate(bindings) if b.destination_type == "exchange"]
    buckets = [n for n, b in enumerate(bindings) if wire.BUCKET_HEADER in b.arguments]
    assert len(buckets) == wire.BUCKETS
    assert patterns
    assert max(buckets) < min(patterns)


@pytest.mark.rabbit
@pytest.mark.timeout(180)
async def test_webhooks_accepted_before_the_first_worker_reach_it_in_order(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given an ingress with the handler in its config, and no worker ever started (and no
        # archive: it would take whatever relay.unrouted would)
        config = relay.config(
            handler_config(http_handler.url, partitions=4), archive={"enabled": False}
        )
        unrouted = await unrouted_depth(config)
        ingress = await relay.run("ingress", config=config)
        await eventually(lambda: ingress_ready(ingress, config), timeout=30, what="ready")

        # When it accepts 600 webhooks over 60 invoices
        sender = EnvoiceSender.to(config)
        await asyncio.wait_for(sender.send(range(1, 61), each=10), 90)
        # Then they wait in the handler's partitions, none in relay.unrouted
        assert sender.refused == 0

        async def all_in_partitions() -> bool:
            return await partitions_depth(config) == 600

        await eventually(all_in_partitions, timeout=10, what="600 in the partitions")
        assert await unrouted_depth(config) == unrouted

        # and a worker started afterwards delivers all 600, each invoice in order
        await relay.worker(config)
        tally = await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), config.settings, timeout=60
        )
    assert tally.accepted == 600
    assert tally.ok, tally
    assert tally.duplicates == 0


@pytest.mark.rabbit
@pytest.mark.timeout(180)
async def test_webhooks_accepted_while_the_worker_crash_loops_are_delivered_once_it_runs(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given an ingress with the handler, and workers whose config has a bad URL scheme
        config = relay.config(handler_config(http_handler.url, partitions=4))
        broken = Config(tmp_path / "broken.toml", config.settings)  # what the worker is given
        broken.path.write_text(config.path.read_text().replace(http_handler.url, "ftp://x/"))
        await relay.run("ingress", config=config)
        sender = EnvoiceSender.to(config)
        sending = asyncio.create_task(sender.send(range(1, 61), each=10))
        # When the worker crash-loops meanwhile (it exits 2 at start, and is started again)
        for _ in range(3):
            crashed = await relay.run("worker", config=broken)
            assert await crashed.exit_code() == 2
        await asyncio.wait_for(sending, 90)
        # and is then restarted with its URL fixed
        await relay.worker(config)

        # Then all 600 webhooks reach the handler, once each, each invoice in order
        tally = await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), config.settings, timeout=60
        )
    assert tally.accepted == 600
    assert tally.ok, tally
    assert tally.duplicates == 0


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_a_worker_declaring_a_new_handler_under_traffic_refuses_nothing(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given an ingress without the handler, taking a steady stream of webhooks (no archive:
        # it would take every webhook, so none could come back unroutable)
        ingress_config = relay.config(archive={"enabled": False})
        exchange = ingress_config.settings.broker.exchange
        ingress = await relay.run("ingress", config=ingress_config)
        await eventually(lambda: ingress_ready(ingress, ingress_config), timeout=30, what="ready")
        sender = EnvoiceSender.to(ingress_config)
        stop = asyncio.Event()
        sending = asyncio.create_task(sender.send(range(1, 21), stop=stop))
        # When a worker declares a new handler of those webhooks meanwhile
        worker_config = shared_exchange(
            relay,
            handler_config(http_handler.url, partitions=8),
            exchange=exchange,
            archive={"enabled": False},
        )
        await relay.worker(worker_config)
        await eventually(lambda: len(list(http_deliveries(http_handler))) >= 100, timeout=30,
                         what="deliveries after the declaration")  # fmt: skip
        stop.set()
        await asyncio.wait_for(sending, 30)

    # Then every webhook was accepted: no answer said "no queue is bound for it"
    assert sender.refused == 0, sender.answers


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_a_partition_change_leaves_no_binding_behind_to_duplicate_keys(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given a handler laid out by a worker with 2 partitions, beside another with 2
        two = relay.config(
            handler_config(http_handler.url, partitions=2),
            handler_config("http://127.0.0.1:9/", name="other", partitions=2),
        )
        first = await relay.worker(two)
        assert await first.terminate() == 0
        # When its config says 4, `relay topology declare` converges, and a worker runs it
        four = changed(relay, two, 0, partitions=4)
        declared = await asyncio.to_thread(
            run_relay, "topology", "declare", "--config", str(four.path)
        )
        assert declared.returncode == 0, declared.stderr
        await relay.start(four)

        # Then 8 keys are each delivered once, and each bucket is bound to one queue
        sender = EnvoiceSender.to(four)
        await asyncio.wait_for(sender.send(range(1, 9), each=2), 60)
        drained = partitions_empty(four.settings, handlers=[four.settings.handlers[0].name])
        tally = await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), drained, timeout=30
        )
        handler = four.settings.handlers[0]
        async with Management(four.settings.broker) as api:
            bindings = await api.bindings_from(handler.exchange)
    assert tally.ok, tally
    assert tally.duplicates == 0
    routes = sorted((int(b["arguments"]["relay-bucket"]), b["destination"]) for b in bindings)
    assert routes == [(b, handler.queue(b % 4)) for b in range(wire.BUCKETS)]


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_topology_declare_dry_run_prints_the_plan_and_changes_nothing(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path / "two.toml", handler_config("http://127.0.0.1:9/", partitions=2)
    )
    name = config.settings.handlers[0].name
    four = tmp_path / "four.toml"
    four.write_text(config.path.read_text().replace("partitions = 2", "partitions = 4"))
    try:
        assert run_relay("topology", "declare", "--config", str(config.path)).returncode == 0

        dry = run_relay("topology", "declare", "--dry-run", "--config", str(four))

        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == [
            f"+ queue relay.{name}.2",
            f"+ queue relay.{name}.3",
            f"+ bind relay.{name} -> relay.{name}.2 buckets " + " ".join(map(str, range(2, 64, 4))),
            f"+ bind relay.{name} -> relay.{name}.3 buckets " + " ".join(map(str, range(3, 64, 4))),
            f"- bind relay.{name} -> relay.{name}.0 buckets " + " ".join(map(str, range(2, 64, 4))),
            f"- bind relay.{name} -> relay.{name}.1 buckets " + " ".join(map(str, range(3, 64, 4))),
            f"~ 32 bucket(s) of relay.{name} change partition: each new partition holds them "
            "until the old one has delivered what it has of them",
            f"would change 7 thing(s) on {config.settings.broker.safe_url}",
        ]
        again = run_relay("topology", "declare", "--dry-run", "--config", str(config.path))
        assert again.stdout.strip().endswith("is as the config says")  # nothing was touched
    finally:
        await delete_topology(load_config(four))


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_topology_declare_runs_take_turns(tmp_path: Path) -> None:
    async with Relay(tmp_path) as relay:
        config = relay.config(handler_config("http://127.0.0.1:9/", partitions=2))
        handler = config.settings.handlers[0]
        turn = f"relay.declaring.{config.settings.broker.exchange}"
        connection = await aio_pika.connect(config.settings.broker.url)
        async with connection:
            # Given another run holding the turn (as `relay topology declare` holds it)
            channel = await connection.channel()
            await channel.declare_queue(turn, exclusive=True, auto_delete=True)
            # When a second run starts
            second = await relay.run("topology", "declare", config=config)
            await eventually(lambda: "waiting for another" in second.output(), timeout=30,
                             what="the second run waiting")  # fmt: skip
            # Then it changes nothing until the first is over
            assert not await exchange_exists(connection, handler.exchange)
        assert await second.exit_code() == 0, second.output()
        connection = await aio_pika.connect(config.settings.broker.url)
        async with connection:
            assert await exchange_exists(connection, handler.exchange)


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_prune_deletes_a_removed_handlers_empty_quorum_queues(tmp_path: Path) -> None:
    # Given two handlers declared, then a config without the second
    both = write_config(
        tmp_path / "both.toml",
        handler_config("http://127.0.0.1:9/", partitions=2),
        handler_config("http://127.0.0.1:9/", name="gone", partitions=2),
    )
    kept, gone = both.settings.handlers
    one = tmp_path / "one.toml"
    raw = tomllib.loads(both.path.read_text())
    raw["handlers"] = raw["handlers"][:1]
    one.write_text(toml(raw))
    try:
        assert run_relay("topology", "declare", "--config", str(both.path)).returncode == 0

        # When `relay topology declare --prune` runs with it
        pruned = run_relay("topology", "declare", "--prune", "--config", str(one))

        # Then the removed handler's queues (quorum: no if-empty delete) are gone, the rest kept
        assert pruned.returncode == 0, pruned.stderr
        for queue in (*gone.queues, gone.dead_letter_queue):
            assert f"- queue {queue} (empty)" in pruned.stdout
        async with Management(both.settings.broker) as api:
            left = {q["name"] for q in await api.queues()}
        assert not left & {*gone.queues, gone.dead_letter_queue}
        assert {*kept.queues, kept.dead_letter_queue} <= left
    finally:
        await delete_topology(both.settings)


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_status_counts_unacknowledged_messages_and_standby_workers(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    release = asyncio.Event()
    http_handler.default = Held(release)
    async with Relay(tmp_path) as relay:
        config = relay.config(handler_config(http_handler.url, timeout_seconds=60))
        await relay.start(config, workers=2)
        sender = EnvoiceSender.to(config)
        await asyncio.wait_for(sender.send([1], each=2), 30)
        await eventually(lambda: len(http_handler.requests) == 1, what="one delivery in flight")

        async def status() -> dict[str, Any] | None:
            done = await asyncio.to_thread(
                run_relay, "status", "--json", "--config", str(config.path)
            )
            assert done.returncode == 0, done.stderr
            [handler] = orjson.loads(done.stdout)["handlers"]
            [partition] = handler["partitions"]
            return partition if partition["unacked"] >= 1 and partition["consumers"] == 2 else None

        partition = await eventually(status, timeout=30, what="status of the held delivery")
        release.set()
    # one delivered and held (unacked), the next waiting behind it; one active worker, one standby
    assert (partition["ready"] + partition["unacked"], partition["depth"]) == (2, 2)
    assert partition["consumers"] == 2


# --- changing the partition count under traffic -------------------------------------------------


def replica(relay: Relay, config: Config) -> Config:
    """The same deployment's config for another ingress replica: another port."""
    raw = tomllib.loads(config.path.read_text())
    raw["ingress"]["port"] = free_port()
    path = relay.directory / f"relay-{len(relay.configs)}.toml"
    path.write_text(toml(raw))
    relay.configs.append(Config(path, load_config(path)))
    return relay.configs[-1]


async def rolling_restart(
    relay: Relay, workers: list[RelayProcess], config: Config
) -> list[RelayProcess]:
    """Each worker in turn: SIGTERM (it drains and exits 0), then one with `config` in its place."""
    restarted = []
    for worker in workers:
        assert await worker.terminate() == 0
        restarted.append(await relay.worker(config))
    return restarted


async def declared(config: Config) -> list[str]:
    done = await asyncio.to_thread(run_relay, "topology", "declare", "--config", str(config.path))
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.rabbit
@pytest.mark.timeout(300)
async def test_partitions_go_4_8_2_under_traffic_and_lose_duplicate_and_reorder_nothing(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    # Given two ingress replicas and two workers of a handler with 4 partitions, 40 invoices
    http_handler.latency = 0.005
    async with Relay(tmp_path) as relay:
        four = relay.config(handler_config(http_handler.url, partitions=4, max_attempts=8))
        other = replica(relay, four)
        for config in (four, other):
            await relay.run("ingress", config=config)
        workers = [await relay.worker(four) for _ in range(2)]
        senders = [
            EnvoiceSender.to(four, pause_seconds=0.02),
            EnvoiceSender.to(other, pause_seconds=0.02),
        ]
        stop = asyncio.Event()
        sending = [
            asyncio.ensure_future(sender.send(invoices, stop=stop))
            for sender, invoices in zip(senders, (range(1, 21), range(21, 41)), strict=True)
        ]

        def accepted() -> int:
            return sum(len(sender.ledger) for sender in senders)

        try:
            # When, with webhooks flowing, the handler goes to 8 partitions and the workers are
            # restarted one by one with that config (the ingresses keep theirs)
            await eventually(lambda: accepted() >= 200, timeout=30, what="traffic")
            eight = changed(relay, four, 0, partitions=8)
            moves_to_eight = await declared(eight)
            workers = await rolling_restart(relay, workers, eight)
            # then to 2 partitions, the same way
            await eventually(lambda: accepted() >= 600, timeout=60, what="more traffic")
            two = changed(relay, four, 0, partitions=2)
            moves_to_two = await declared(two)
            workers = await rolling_restart(relay, workers, two)
            await eventually(lambda: accepted() >= 1000, timeout=60, what="traffic after")
        finally:
            stop.set()
            await asyncio.gather(*sending)

        # Then everything accepted is delivered once, each invoice in acceptance order
        tallies = [
            await sender.ledger.delivered(
                lambda: http_deliveries(http_handler), eight.settings, timeout=60
            )
            for sender in senders
        ]
        tally = tallies[0] + tallies[1]
        print(f"partitions 4 -> 8 -> 2 under traffic: {tally.line()}")
        # and the old partitions are reported, drained, for --prune
        leftovers = await declared(two)
    assert any(line.startswith("~ 32 bucket(s)") for line in moves_to_eight)
    assert any(line.startswith("~ 48 bucket(s)") for line in moves_to_two)
    assert tally.ok, str(tally)
    # Repeats come only from the four restarts (deliveries in flight, acks the broker had not
    # applied, a change's window of duplicates when the worker keeping it stops): at most one
    # window of deliveries in flight each
    assert tally.duplicates <= 4 * four.settings.handlers[0].concurrency
    handler = two.settings.handlers[0]
    reported = [line.split()[2] for line in leftovers if line.startswith("= queue")]
    assert reported == [handler.queue(i) for i in range(2, 8)]  # figures: sampled every 5 s
