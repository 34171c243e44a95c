"""Fixtures of tests that run relay processes or need a vhost of their own (a pytest plugin:
tests/conftest.py loads it, since tests/processes.py imports tests/conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.processes import Broker, Relay
from tests.support import AMQP_URL, management


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    """Config files and relay processes; after the test, processes still running are killed,
    every output is printed (pytest shows it when the test fails), the queues deleted."""
    async with Relay(tmp_path) as relay:
        yield relay


@pytest.fixture
async def broker(relay: Relay) -> AsyncIterator[Broker]:
    """The local RabbitMQ app, for the test to stop: started again after it, even if it fails
    (and before `relay` deletes the test's queues, hence the dependency)."""
    broker = Broker()
    try:
        yield broker
    finally:
        await broker.restore()


@pytest.fixture
async def vhost() -> AsyncIterator[str]:
    """A vhost of the test's own, so that relay.archive there is the test's (the suite's vhost
    shares one between its tests): its AMQP URL. Deleted after the test, with all it holds."""
    suite = urlsplit(AMQP_URL)
    name = f"relay-test-archive-{uuid.uuid4().hex[:8]}"
    async with management(AMQP_URL) as api:
        async with api.put(f"/api/vhosts/{name}") as created:
            created.raise_for_status()
        grant = {"configure": ".*", "write": ".*", "read": ".*"}
        async with api.put(
            f"/api/permissions/{name}/{suite.username or 'guest'}", json=grant
        ) as granted:
            granted.raise_for_status()
        try:
            yield suite._replace(path=f"/{name}").geturl()
        finally:
            async with api.delete(f"/api/vhosts/{name}") as deleted:
                deleted.raise_for_status()
