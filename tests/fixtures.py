"""Fixtures of tests that run relay processes (a pytest plugin: tests/conftest.py loads it, since
tests/processes.py imports tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.processes import Broker, Relay


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
