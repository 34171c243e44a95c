"""Fixtures: settings with test-unique broker names (cleaned up after), broker connections,
in-process workers, a publisher, HTTP and Python handlers, captured logs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from relay import topology
from relay.config import from_dict as config_from_dict
from relay.config import load as load_config
from relay.providers import Event
from relay.publisher import Publisher
from relay.settings import Settings
from tests import handlers_for_tests
from tests.handlers_for_tests import HttpHandler
from tests.support import AMQP_URL as AMQP_URL  # the suite's broker and vhost, for the tests
from tests.support import (
    STOP_WITHIN,
    RunningWorker,
    TcpProxy,
    as_written,
    declare_topology,
    eventually,
    toml,
)

pytest_plugins = ["tests.fixtures"]  # `relay` and `broker`: they need tests/processes.py


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="also run the tests marked long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long: run with --long")
    for item in items:
        if item.get_closest_marker("long"):
            item.add_marker(skip)


SECRET = "test-secret"
SHARED_QUEUES = {
    topology.UNROUTED,
    topology.STATE_STREAM,
    topology.ARCHIVE,
    topology.ACCEPTED_IDS,
}  # every relay declares them: never deleted
SHARED_EXCHANGES = {topology.UNROUTED}


def settings_dict(
    suffix: str,
    *,
    handlers: list[dict[str, Any]] | None = None,
    url: str = AMQP_URL,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A config dict with names unique to one test: the exchange and every handler name."""
    source = {
        "name": "envoice",
        "path": "/webhooks/envoice",
        "scheme": "envoice",
        "secrets": [SECRET],
        **sections.pop("source", {}),
    }
    raw: dict[str, Any] = {
        "broker": {"url": url, "exchange": f"relay.test-{suffix}", **sections.pop("broker", {})},
        "ingress": {"host": "127.0.0.1", "port": 0, **sections.pop("ingress", {})},
        **({"worker": sections.pop("worker")} if "worker" in sections else {}),
        **({"archive": sections.pop("archive")} if "archive" in sections else {}),
        **({"repeats": sections.pop("repeats")} if "repeats" in sections else {}),
        **({"console": sections.pop("console")} if "console" in sections else {}),
        "sources": [source],
        "handlers": [
            {**h, "name": f"{h['name']}-{suffix}"}
            for h in (handlers if handlers is not None else [])
        ],
    }
    assert not sections, f"unknown sections {sections}"
    return raw


async def delete_topology(settings: Settings) -> None:
    """Delete the queues and exchanges relay declares for `settings`, except the shared ones.

    Connects to the broker directly: a test's settings may point at a proxy it has cut."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        described = topology.describe(settings)
        for queue in described.queues:
            if queue.name not in SHARED_QUEUES:
                await (await connection.channel()).queue_delete(queue.name)
        for exchange in described.exchanges:
            if exchange.name not in SHARED_EXCHANGES:
                await (await connection.channel()).exchange_delete(exchange.name)


class SettingsFactory:
    """`make_settings(handlers=[...], ...)`: settings with names unique to the test (see
    `settings_dict`); `make_settings.config_file(settings)` writes them as a TOML file."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._raw: dict[str, dict[str, Any]] = {}  # by exchange name
        self.made: list[Settings] = []

    def __call__(self, **kwargs: Any) -> Settings:
        raw = settings_dict(uuid.uuid4().hex[:8], **kwargs)
        with as_written():
            settings = config_from_dict(raw)
        self._raw[settings.broker.exchange] = raw
        self.made.append(settings)
        return settings

    def config_file(self, settings: Settings) -> str:
        path = self._directory / f"{settings.broker.exchange}.toml"
        path.write_text(toml(self._raw[settings.broker.exchange]), encoding="utf-8")
        with as_written():
            assert load_config(path) == settings
        return str(path)


MakeSettings = SettingsFactory


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A TCP proxy to the broker that the test can cut, stall and restore."""
    proxy = TcpProxy()
    await proxy.start()
    yield proxy
    await proxy.cut()


@pytest.fixture
async def make_settings(tmp_path: Path) -> AsyncIterator[MakeSettings]:
    """Settings factory; everything the settings name on the broker is deleted after the test."""
    factory = SettingsFactory(tmp_path)
    yield factory
    for settings in factory.made:
        await delete_topology(settings)


@pytest.fixture
async def connection() -> AsyncIterator[AbstractConnection]:
    """A connection to the real broker, for a test to inspect or arrange queues."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        yield connection


@pytest.fixture
async def channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel on the real broker, for a test to inspect or arrange queues."""
    return await connection.channel()


# --- workers, publishing, handlers ------------------------------------------------------------

StartWorker = Callable[[Settings], Awaitable[RunningWorker]]
Publish = Callable[..., Awaitable[None]]


@pytest.fixture
async def start_worker(make_settings: MakeSettings) -> AsyncIterator[StartWorker]:
    """Starts workers and waits until they consume; stops those still running after the test.

    Depends on `make_settings` so that workers stop before their queues are deleted.
    """
    workers: list[RunningWorker] = []

    async def start(settings: Settings) -> RunningWorker:
        running = RunningWorker(settings)
        workers.append(running)
        await running.started()
        return running

    yield start
    for running in workers:
        running.worker.stop()
    tasks = {w.task for w in workers}
    if tasks:
        _, stuck = await asyncio.wait(tasks, timeout=STOP_WITHIN)
        for task in stuck:
            task.cancel()
        assert not stuck, "a worker did not stop"


@pytest.fixture
async def publish() -> AsyncIterator[Publish]:
    """`await publish(settings, *events)`: publishes in order, each confirmed by the broker.

    The first publish for some settings declares their whole topology first, as an operator
    runs `relay topology declare` before traffic arrives (else it would wait in relay.unrouted
    until a worker declared its handler)."""
    publishers: dict[tuple[str, str], Publisher] = {}

    async def publish(settings: Settings, *events: Event) -> None:
        key = (settings.broker.url, settings.broker.exchange)
        if key not in publishers:
            await declare_topology(settings)
            publishers[key] = Publisher(settings)
            publishers[key].start()
        publisher = publishers[key]
        await eventually(lambda: publisher.ready, what="publisher connected")
        for event in events:
            await publisher.publish(event)

    yield publish
    for publisher in publishers.values():
        await publisher.stop()


@pytest.fixture(autouse=True)
def _fresh_recorder() -> Iterator[None]:
    handlers_for_tests.reset()
    yield
    handlers_for_tests.reset()


@pytest.fixture
async def http_handler() -> AsyncIterator[HttpHandler]:
    async with HttpHandler() as server:
        yield server


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """What in-process relay code logs during the test, one dict per line (`event`, fields)."""
    with structlog.testing.capture_logs() as captured:
        yield captured
