"""A worker's memory with a handler's outcome log full of ids: what repeats cost a worker.

Writes --ids outcome records (64 to a message, as a busy worker's group commits do) into the
outcome log of a handler of its own, starts `relay worker`, and reads its resident memory once
it has read them all (its `relay_remembered_ids` gauge), against the same worker on an empty log
in the same run, and how fast it read them (what a worker takes over at start or failover).

    python -m tests.bench.remembered --ids 1000000

Needs RabbitMQ on $RELAY_AMQP_URL; talks only to 127.0.0.1; deletes what it declared.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiohttp

from relay import wire
from tests.bench.common import (
    AMQP_URL,
    SOURCE_CONFIG,
    STARTUP_SECONDS,
    BenchError,
    Child,
    free_port,
    memory_kb,
)

BATCH = 64  # records a message
IN_FLIGHT = 200  # messages awaiting their confirm
READ_SECONDS = 600.0  # for the worker to read the log

CONFIG = (
    SOURCE_CONFIG
    + """[worker]
metrics_port = {metrics}
[[handlers]]
name = "{handler}"
events = ["envoice.#"]
url = "http://127.0.0.1:9/"
partitions = 1
"""
)


async def fill(queue: str, handler: str, ids: int) -> None:
    """`ids` outcome records of delivered messages into the stream `queue`."""
    now = datetime.now(UTC)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        pending: set[asyncio.Future[object]] = set()
        for first in range(0, ids, BATCH):
            records = [
                {"outcome": wire.DELIVERED, "handler": handler, "id": f"envoice:{n}",
                 "key": f"invoice:{n % 1000}", "at": now.isoformat()}
                for n in range(first, min(first + BATCH, ids))
            ]  # fmt: skip
            publish = channel.default_exchange.publish(wire.outcomes_message(records), queue)
            pending.add(asyncio.ensure_future(publish))
            if len(pending) >= IN_FLIGHT:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)


async def remembered(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    found = re.search(r'^relay_remembered_ids\{of="handler [^"]+"\} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


async def measure(directory: Path, ids: int) -> tuple[float, float]:
    """The worker's RSS (MB) once it has read `ids` records, and the seconds that took."""
    tag = uuid.uuid4().hex[:8]
    handler, metrics = f"remembered{tag}", free_port()
    config = directory / f"{tag}.toml"
    config.write_text(
        CONFIG.format(exchange=f"relay.bench-{tag}", port=free_port(), path="/webhooks/envoice",
                      secret="bench-secret", metrics=metrics, handler=handler)
    )  # fmt: skip
    declare = await Child.start("topology", directory / f"{tag}-topology.log", "-m", "relay",
                                "topology", "declare", "--config", str(config))  # fmt: skip
    if await asyncio.wait_for(declare.process.wait(), STARTUP_SECONDS) != 0:
        raise BenchError(f"relay topology declare failed:\n{declare.log_tail()}")
    queues = [f"relay.{handler}.0", f"relay.{handler}.dlq", f"relay.{handler}.outcomes"]
    try:
        await fill(queues[-1], handler, ids)
        log = directory / f"{tag}-worker.log"
        worker = await Child.start("worker", log, "-m", "relay", "worker", "--config",
                                   str(config), "--log-level", "warning")  # fmt: skip
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession() as session:
                while True:
                    worker.check_alive()
                    try:
                        if await remembered(session, metrics) >= ids:
                            break
                    except aiohttp.ClientError:
                        pass  # not serving yet
                    if time.monotonic() - started > READ_SECONDS:
                        raise BenchError(f"the worker did not read {ids} ids in {READ_SECONDS} s")
                    await asyncio.sleep(0.2)
            took = time.monotonic() - started
            return memory_kb(worker.process.pid, "VmRSS") / 1024, took
        finally:
            await worker.stop()
    finally:
        async with await aio_pika.connect(AMQP_URL) as connection:
            for name in queues:
                await (await connection.channel()).queue_delete(name)
            for name in (f"relay.{handler}", f"relay.bench-{tag}"):
                await (await connection.channel()).exchange_delete(name)


async def run(ids: int) -> str:
    with tempfile.TemporaryDirectory(prefix="relay-bench-remembered-") as directory:
        empty, _ = await measure(Path(directory), 0)
        full, took = await measure(Path(directory), ids)
    per_id = (full - empty) * 1024 * 1024 / ids
    return (
        f"worker RSS: {empty:.0f} MB with an empty outcome log, {full:.0f} MB with {ids:,} ids "
        f"remembered (+{full - empty:.0f} MB, {per_id:.0f} bytes an id); read in {took:.1f} s "
        f"({ids / took:,.0f} ids/s, from start to the last one)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    args = parser.parse_args()
    try:
        print(asyncio.run(run(args.ids)))
    except (BenchError, TimeoutError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
