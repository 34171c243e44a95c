"""What relay's ingress uses of aiohttp's undocumented internals: every such use is here.

Three things aiohttp offers no public way to do: name the server in the `Server` header of every
answer (its own protocol errors included), listen with a protocol of relay's choosing per
connection (relay/ingress.py `LimitedSite` answers connections over its limit itself), and send
`100 Continue` as aiohttp's default expect handler does. tests/test_fences.py checks that aiohttp
still has what they rely on, and pyproject.toml bounds aiohttp below its next minor release.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_response

Connections = Callable[[web.Server], Callable[[], asyncio.BaseProtocol]]


def name_server(name: str) -> None:
    """Answers name only `name` in their `Server` header: no aiohttp or Python version."""
    web_response.SERVER_SOFTWARE = name  # type: ignore[attr-defined]


async def start_site(site: web.TCPSite, connections: Connections, backlog: int) -> list[Any]:
    """Start `site` as `TCPSite.start` does (host, port, `reuse_port`, `backlog`; no TLS or
    `reuse_address`, which relay does not set), but with its connections made by
    `connections(server)`, `server` being the runner's `web.Server`. Returns the listening
    sockets."""
    await web.BaseSite.start(site)  # registers the site with its runner
    server = site._runner.server
    assert server is not None
    loop = asyncio.get_running_loop()
    site._server = await loop.create_server(
        connections(server), site._host, site._port, reuse_port=site._reuse_port, backlog=backlog
    )
    site._bound_port = site._server.sockets[0].getsockname()[1]
    return list(site._server.sockets)


async def send_continue(request: web.Request) -> None:
    """`100 Continue`, written and left out of the answer's size as aiohttp's default expect
    handler does."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0
