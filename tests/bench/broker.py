"""The broker ceiling through the client: raw aio-pika confirmed persistent publishes to an
exchange bound to one quorum queue, `--in-flight` at a time, for `--seconds`; prints msg/s.

    python -m tests.bench.broker --exchange relay.bench --seconds 10 [--in-flight 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aio_pika
import orjson
import uvloop

AMQP_URL = os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BODY = orjson.dumps({"Id": 1, "Type": 11, "InvoiceId": 42, "Message": "x" * 200})


async def publish_loop(exchange_name: str, seconds: float, in_flight: int) -> float:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        deadline = time.monotonic() + seconds
        confirmed = 0

        async def publisher() -> None:
            nonlocal confirmed
            while time.monotonic() < deadline:
                message = aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await exchange.publish(message, routing_key="envoice.paid")
                confirmed += 1

        started = time.monotonic()
        await asyncio.gather(*(publisher() for _ in range(in_flight)))
        return confirmed / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=500)
    args = parser.parse_args()
    rate = uvloop.run(publish_loop(args.exchange, args.seconds, args.in_flight))
    print(f"CONFIRMED_PER_SECOND {rate:.0f}")


if __name__ == "__main__":
    main()
