"""Replays from the archive (relay/replays.py, `relay replay`) and the backfill of a new handler:
each key in acceptance order, never ahead of older messages still waiting, only to the handler
asked for, no gap and no repeat at the switch to live traffic."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from relay import replays, wire
from relay.broker import BROKER_ERRORS
from relay.errors import OptionError
from relay.ops.replay import parse_time
from relay.replays import Replay
from relay.settings import duration_seconds
from tests.handlers_for_tests import HttpHandler, Request
from tests.processes import (
    EnvoiceSender,
    Ledger,
    Relay,
    billing_handler,
    http_deliveries,
    ingress_ready,
    write_config,
)
from tests.support import eventually

# --- without a broker -------------------------------------------------------------------------


def test_times_are_rfc_3339_or_durations_back_from_now() -> None:
    now = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)

    assert parse_time("90m", now) == now - timedelta(minutes=90)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("7d", now) == now - timedelta(days=7)
    assert parse_time("2026-12-07T13:00:00Z", now) == now - timedelta(hours=1)
    assert parse_time("2026-12-07T15:00:00+02:00", now) == now - timedelta(hours=1)
    with pytest.raises(OptionError, match="no time zone"):
        parse_time("2026-12-07T13:00:00", now)
    with pytest.raises(OptionError, match="neither an RFC 3339 time"):
        parse_time("yesterday", now)
    assert duration_seconds("3w") is None


def test_a_replay_survives_its_record() -> None:
    since = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)
    replay = Replay.new(
        "billing", since, until=since + timedelta(hours=1), keys=("invoice:1",), events=("a.*",)
    )

    record = wire.read_record(replay.record().body)

    assert record is not None
    assert Replay.of(record) == replay
    assert {replay.before, replay.fill, replay.after} == {
        record["before"],
        record["fill"],
        record["after"],
    }


# --- against the broker -----------------------------------------------------------------------


def deliveries_per_id(handler: HttpHandler) -> Counter[str]:
    return Counter(r.id for r in handler.requests if r.accepted)


@pytest.mark.rabbit
@pytest.mark.timeout(240)
async def test_a_replay_since_t_delivers_the_archive_again_in_key_order_while_traffic_flows(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with HttpHandler() as other, Relay(tmp_path) as relay:
        # Given billing and another handler that answered 200 to 500 webhooks over 20 invoices,
        # T being the time between the first 240 and the last 260
        config = relay.config(
            billing_handler(http_handler),
            {**billing_handler(other), "name": "other", "partitions": 2},
        )
        await relay.start(config)
        sender = EnvoiceSender.to(config)
        await asyncio.wait_for(sender.send(range(1, 21), each=12), 60)
        await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), config.settings, timeout=30
        )
        since = datetime.now(UTC)
        first_half = set(deliveries_per_id(http_handler))
        await asyncio.wait_for(sender.send(range(1, 21), each=13), 60)
        await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), config.settings, timeout=30
        )
        second_half = set(deliveries_per_id(http_handler)) - first_half
        assert (len(first_half), len(second_half)) == (240, 260)

        # When billing is replayed since T while new webhooks keep flowing
        live = EnvoiceSender.to(config, pause_seconds=0.05)
        stop = asyncio.Event()
        flowing = asyncio.create_task(live.send(range(1, 21), stop=stop))
        replay = await relay.run("replay", "--handler", config.settings.handlers[0].name,
                                 "--since", since.isoformat(), config=config)  # fmt: skip
        assert await asyncio.wait_for(replay.process.wait(), 120) == 0, replay.output()
        # (polled slowly: the handler's server shares this process)
        await eventually(lambda: all(deliveries_per_id(http_handler)[i] >= 2 for i in second_half),
                         timeout=60, interval=0.5, what="the replay delivered")  # fmt: skip
        await eventually(lambda: len(live.ledger) >= 100, timeout=30, what="live traffic")
        stop.set()
        await asyncio.wait_for(flowing, 30)
        await live.ledger.delivered(
            lambda: http_deliveries(http_handler), config.settings, timeout=30
        )
        await live.ledger.delivered(lambda: http_deliveries(other), config.settings, timeout=30)

    # Then billing got each archived message since T once more, marked with the replay's id
    [replay_id] = re.findall(r"^replay (\w+): queued (\d+)", replay.output(), re.M)
    ok = [r for r in http_handler.requests if r.accepted]
    again = [r.id for r in ok if r.headers.get("x-relay-replayed") == replay_id[0]]
    first = [r.id for r in ok if "x-relay-replayed" not in r.headers]
    assert len(again) == len(set(again)) == int(replay_id[1])
    assert second_half <= set(again)
    assert not first_half & set(again)
    # and every webhook once otherwise (live ones the replay delivered only once, replayed)
    live_ids = {i for ids in live.ledger.accepted.values() for i in ids}
    assert len(first) == len(set(first))
    assert set(first) | set(again) == first_half | second_half | live_ids
    # each key in order: first deliveries, replays, and replays before newer live ones
    check_replay_order(ok, merged(sender.ledger, live.ledger), replay_id[0])
    # and the other handler got nothing extra
    everything = first_half | second_half | live_ids
    assert deliveries_per_id(other) == Counter(dict.fromkeys(everything, 1))


def merged(*ledgers: Ledger) -> dict[str, list[str]]:
    """Per key, the ids the ledgers accepted, in acceptance order (one ledger after another)."""
    keys: dict[str, list[str]] = defaultdict(list)
    for ledger in ledgers:
        for key, ids in ledger.accepted.items():
            keys[key] += ids
    return keys


def check_replay_order(
    requests: list[Request], accepted: dict[str, list[str]], replay: str
) -> None:
    rank = {i: n for ids in accepted.values() for n, i in enumerate(ids)}
    order: dict[str, list[tuple[str, bool]]] = defaultdict(list)  # (id, the replay's)
    for request in requests:
        order[request.key].append((request.id, request.headers.get("x-relay-replayed") == replay))
    for key, ids in accepted.items():
        firsts = [i for i, again in order[key] if not again]
        replayed = [i for i, again in order[key] if again]
        assert firsts == [i for i in ids if i in firsts], f"{key}: first deliveries reordered"
        assert replayed == sorted(replayed, key=rank.__getitem__), f"{key}: replay reordered"
        if not replayed:
            continue
        last = max(n for n, (_, again) in enumerate(order[key]) if again)
        newest = rank[replayed[-1]]
        newer_live = [n for n, (i, again) in enumerate(order[key]) if rank[i] > newest]
        assert all(n > last for n in newer_live), f"{key}: live before its replay"


@pytest.mark.rabbit
@pytest.mark.timeout(420)
@pytest.mark.parametrize("creator", ["worker", "topology declare"])
async def test_a_handler_added_with_a_backfill_gets_everything_since_t_once_in_key_order(
    tmp_path: Path, http_handler: HttpHandler, creator: str
) -> None:
    async with Relay(tmp_path) as relay, HttpHandler() as first:
        # Given relay running with one handler, webhooks flowing all along
        config = relay.config(billing_handler(first))
        await relay.start(config)
        exchange = config.settings.broker.exchange
        sender = EnvoiceSender.to(config, pause_seconds=0.2)  # about 100 a second
        stop = asyncio.Event()
        flowing = asyncio.create_task(sender.send(range(1, 21), stop=stop))
        await eventually(lambda: len(sender.ledger) >= 200, timeout=60, what="200 accepted")

        # When a handler is added with a backfill of 5 minutes (all of them), created by its
        # first worker or by `relay topology declare`, its worker started
        added = write_config(
            tmp_path / "added.toml",
            {**billing_handler(http_handler), "name": "added", "backfill": "5m"},
            broker={"exchange": exchange},
        )
        relay.configs.append(added)
        before = len(sender.ledger)
        if creator == "topology declare":  # as the deployment files do before relay starts
            declare = await relay.run("topology", "declare", config=added)
            assert await declare.exit_code() == 0, declare.output()
            assert "is new: it first gets the archive's messages" in declare.output()
        await relay.worker(added)

        def backfilled_and_live() -> bool:
            return len(list(http_deliveries(http_handler))) >= before + 100

        await eventually(
            backfilled_and_live, timeout=120, interval=0.5, what="the backfill and live traffic"
        )
        stop.set()
        await asyncio.wait_for(flowing, 30)

        # Then it gets every webhook accepted since, each exactly once, each key in order
        tally = await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), config.settings, timeout=120
        )
    assert tally.accepted >= 300
    assert tally.ok, tally
    assert tally.duplicates == 0, tally


@pytest.mark.rabbit
@pytest.mark.timeout(120)
async def test_a_dry_run_counts_per_event_and_changes_nothing(
    tmp_path: Path, http_handler: HttpHandler
) -> None:
    async with Relay(tmp_path) as relay:
        # Given 30 webhooks accepted and delivered
        config = relay.config(billing_handler(http_handler))
        await relay.start(config)
        sender = EnvoiceSender.to(config)
        await asyncio.wait_for(sender.send(range(1, 4), each=10), 60)
        await sender.ledger.delivered(
            lambda: http_deliveries(http_handler), config.settings, timeout=30
        )
        name = config.settings.handlers[0].name

        # When a dry run asks for the last hour
        dry = await relay.run("replay", "--handler", name, "--since", "1h", "--dry-run",
                              config=config)  # fmt: skip
        code = await dry.exit_code()

    # Then it counts the 30 per event, and changes nothing
    assert code == 0, dry.output()
    assert "      30  envoice.paid" in dry.output()
    assert "would replay 30 message(s)" in dry.output()
    assert len(http_handler.accepted()) == 30


@pytest.mark.rabbit
@pytest.mark.timeout(180)
async def test_a_replay_from_before_what_the_archive_kept_says_how_far_back_it_reaches(
    tmp_path: Path, vhost: str
) -> None:
    async with Relay(tmp_path, url=vhost) as relay:
        # Given an archive that keeps a second, in segments of a few messages
        config = relay.config(
            {"name": "h", "events": ["envoice.#"], "url": "http://127.0.0.1:9/"},
            archive={"max_age": "1s", "segment_bytes": 2000},
        )
        ingress = await relay.run("ingress", config=config)
        await eventually(lambda: ingress_ready(ingress, config), timeout=30, what="ready")
        sender = EnvoiceSender.to(config)

        async def dropped() -> datetime | None:
            await sender.send(range(1, 3), each=2)  # a segment rolls over: retention runs
            # (a consumer at `first` while retention deletes a segment may lose its connection
            # with INTERNAL_ERROR on RabbitMQ 3.10.8: docs/RABBITMQ.md; then look again)
            with contextlib.suppress(*BROKER_ERRORS):
                async with await aio_pika.connect(vhost) as connection:
                    return await replays.archive_reach(connection)
            return None

        # When its retention has dropped the oldest segments
        reach: datetime = await eventually(
            dropped, timeout=60, interval=0.5, what="segments dropped"
        )
        # Then a replay from before them says how far back the archive reaches, and fails
        name = config.settings.handlers[0].name
        too_old = await relay.run("replay", "--handler", name, "--since", "1h", config=config)
        code = await too_old.exit_code()
    assert code == 1
    [line] = [x for x in too_old.output().splitlines() if x.startswith("relay:")]
    assert f"the archive reaches back to {reach.isoformat()} only" in line, line
