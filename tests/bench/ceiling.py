"""The HTTP ceiling: an aiohttp handler that only reads the body and answers 200, on uvloop.
What no aiohttp ingress on this machine can beat.

    python -m tests.bench.ceiling --port 8092
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web

ANSWER = b'{"status":"accepted"}'


async def serve(port: int) -> None:
    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/webhooks/envoice", receive)
    app.router.add_get("/readyz", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
