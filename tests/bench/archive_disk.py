"""Broker disk taken by the archive: bytes on disk per webhook as relay archives them.

Publishes --count signed Envoice webhooks' messages exactly as the ingress builds them (relay's
Publisher: the envelope, headers and properties of the wire contract) to an exchange of its own
that has only a stream bound to it, with the archive's arguments (`[archive]` defaults), then
sums the stream's files (segments and indexes) in the broker's data directory. So it must run on
the broker's machine, as a user that may read that directory (root). From the repo root:

    python -m tests.bench.archive_disk --count 100000

Needs RabbitMQ on $RELAY_AMQP_URL and `rabbitmqctl`. Deletes the stream and exchange it declared.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika

from relay import topology
from relay.config import from_dict
from relay.providers import PROVIDERS
from relay.publisher import Publisher
from relay.settings import ArchiveSettings
from tests.bench.common import AMQP_URL

IN_FLIGHT = 500
READY_SECONDS = 30.0
SECRET = "bench-secret"


def stream_bytes(vhost: str, queue: str) -> int:
    """The size of a stream's files on the local broker's disk."""
    said = subprocess.run(["rabbitmqctl", "eval", "rabbit_mnesia:dir()."], capture_output=True,
                          text=True, timeout=60, check=True).stdout  # fmt: skip
    match = re.search(r'"(.+)"', said)
    if match is None:
        raise RuntimeError(f"rabbitmqctl did not name the data directory: {said!r}")
    name = f"{vhost}_{queue}".replace(".", "_").replace("/", "_")
    directories = list(Path(match.group(1), "stream").glob(f"{name}_*"))
    if len(directories) != 1:
        raise RuntimeError(f"expected one directory for {queue}, found {directories}")
    return sum(f.stat().st_size for f in directories[0].iterdir())


async def run(count: int) -> None:
    tag = uuid.uuid4().hex[:8]
    exchange, stream = f"relay.bench-disk-{tag}", f"relay.bench-disk-{tag}"
    raw = {
        "broker": {"url": AMQP_URL, "exchange": exchange},
        "archive": {"enabled": False},  # only the stream below is bound to the exchange
        "sources": [{"name": "envoice", "path": "/e", "scheme": "envoice", "secrets": [SECRET]}],
    }
    settings = from_dict(raw)
    source = settings.sources[0]
    provider = PROVIDERS["envoice"]
    arguments = topology.archive_queue(ArchiveSettings()).arguments
    connection = await aio_pika.connect(AMQP_URL)
    publisher = Publisher(settings)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(
            exchange, "topic", durable=True, arguments={"alternate-exchange": topology.UNROUTED}
        )
        queue = await channel.declare_queue(stream, durable=True, arguments=arguments)
        await queue.bind(exchange, "#")
        publisher.start()
        async with asyncio.timeout(READY_SECONDS):
            while not publisher.ready:  # noqa: ASYNC110 - the publisher offers no event to await
                await asyncio.sleep(0.05)
        first, started = time.time_ns() // 1000, time.monotonic()
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def publish(n: int) -> None:
            async with limit:
                now = time.time()
                request = provider.sample(source, event_id=first + n, key=n % 1000, now=now)
                await publisher.publish(provider.parse(request, source, now))

        await asyncio.gather(*(publish(n) for n in range(count)))
        seconds = time.monotonic() - started
        vhost = unquote(urlsplit(AMQP_URL).path[1:]) or "/"
        size = stream_bytes(vhost, stream)
        print(f"{count} webhooks archived in {seconds:.1f} s: {size:,} bytes on disk, "
              f"{size / count:.0f} bytes per webhook, {size * 100_000 / count / 1e6:.1f} MB "
              "per 100,000")  # fmt: skip
        for rate in (10, 100, 1000):
            print(f"  {rate}/s: {size / count * rate * 86400 / 1e9:.2f} GB a day")
    finally:
        await publisher.stop()
        channel = await connection.channel()
        await channel.queue_delete(stream)
        await channel.exchange_delete(exchange)
        await connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(run(args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
