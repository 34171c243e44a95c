"""The plain relay a user writes in an afternoon, the baseline of `relay ingress`: an aiohttp
handler that reads the body, computes its HMAC, parses it with orjson and publishes it with
aio-pika's `Exchange.publish` on a confirm-mode channel, answering 200 after the confirm.

    python -m tests.bench.plain --port 8091 --exchange relay.bench [--uvloop]

It declares nothing: the exchange must exist (tests/bench/ingress.py declares it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os

import aio_pika
import orjson
from aiohttp import web

AMQP_URL = os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SECRET = b"bench-secret"


async def serve(port: int, exchange_name: str) -> None:
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(exchange_name, ensure=False)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        activity = orjson.loads(body)["Activity"]
        message = aio_pika.Message(
            orjson.dumps(activity),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(activity["Id"]),
            content_type="application/json",
        )
        await exchange.publish(message, routing_key="envoice.paid")
        return web.json_response({"status": "accepted", "id": activity["Id"]}, dumps=_dumps)

    app = web.Application()
    app.router.add_post("/webhooks/envoice", receive)
    app.router.add_get("/readyz", lambda _: _ok())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def _ok() -> web.Response:
    return web.json_response({"status": "ready"})


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port, args.exchange))
    else:
        asyncio.run(serve(args.port, args.exchange))


if __name__ == "__main__":
    main()
