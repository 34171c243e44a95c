"""The AMQP heartbeat relay asks for (broker.heartbeat_seconds): what lets a process connected
to a node that is cut off from it notice within about half a minute instead of three."""

from __future__ import annotations

import asyncio
from urllib.parse import quote, urlsplit

import pytest
from aio_pika.abc import AbstractConnection

from relay.broker import keep_connected
from relay.settings import BrokerSettings, with_heartbeat
from tests.conftest import AMQP_URL
from tests.support import eventually, management


def test_a_url_gets_the_heartbeat_unless_it_names_one() -> None:
    # Given URLs with and without a query, one naming a heartbeat of its own
    # When relay's connection URLs are made from them
    # Then each asks for the setting's heartbeat, except the one that names its own
    assert with_heartbeat("amqp://u:p@h:5672/v", 10) == "amqp://u:p@h:5672/v?heartbeat=10"
    assert with_heartbeat("amqp://h/v?ssl=1", 10) == "amqp://h/v?ssl=1&heartbeat=10"
    assert with_heartbeat("amqp://h/v?heartbeat=30", 10) == "amqp://h/v?heartbeat=30"
    broker = BrokerSettings(url="amqp://a/", other_urls=("amqp://b/?heartbeat=5",))
    assert broker.connection_urls == ("amqp://a/?heartbeat=10", "amqp://b/?heartbeat=5")
    assert broker.urls == ("amqp://a/", "amqp://b/?heartbeat=5")  # as configured


async def negotiated_heartbeat(broker: BrokerSettings, name: str) -> int:
    """The heartbeat (s) the broker lists for a connection relay's keep_connected opens with
    `broker`'s settings, named `name` (management API, `timeout`)."""
    opened: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def session(connection: AbstractConnection, over: asyncio.Event) -> None:
        opened.set_result(connection)
        await done.wait()

    keeping = asyncio.ensure_future(
        keep_connected(broker.connection_urls, session, what=name, until=done)
    )
    try:
        await asyncio.wait_for(asyncio.shield(opened), 10)
        vhost = quote(urlsplit(AMQP_URL).path[1:] or "/", safe="")

        async def listed() -> int | None:
            async with (
                management(AMQP_URL) as api,
                api.get(f"/api/vhosts/{vhost}/connections") as got,
            ):
                connections = await got.json()
            for c in connections:
                if c.get("client_properties", {}).get("connection_name") == f"relay {name}":
                    return int(c["timeout"])
            return None

        found: int = await eventually(listed, timeout=15, interval=0.5, what=f"{name} listed")
        return found
    finally:
        done.set()
        await asyncio.wait_for(keeping, 10)


@pytest.mark.timeout(60)
async def test_relay_connections_negotiate_the_configured_heartbeat() -> None:
    # Given broker settings with the default heartbeat, and a URL that names its own
    default = BrokerSettings(url=AMQP_URL)
    own = BrokerSettings(url=with_heartbeat(AMQP_URL, 7))
    # When relay connects with each
    # Then the broker lists the default (10 s, not aiormq's 60) and the URL's own
    assert await negotiated_heartbeat(default, "heartbeat-default") == 10
    assert await negotiated_heartbeat(own, "heartbeat-own") == 7
