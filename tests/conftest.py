"""Fixtures: settings with test-unique broker names (cleaned up after), broker connections."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from relay import topology
from relay.settings import Settings

AMQP_URL = os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@localhost:5672/")
SECRET = "test-secret"

MakeSettings = Callable[..., Settings]


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
        "sources": [source],
        "handlers": [
            {**h, "name": f"{h['name']}-{suffix}"}
            for h in (handlers if handlers is not None else [])
        ],
    }
    assert not sections, f"unknown sections {sections}"
    return raw


@pytest.fixture
async def make_settings() -> AsyncIterator[MakeSettings]:
    """Settings factory; everything the settings name on the broker is deleted after the test."""
    made: list[Settings] = []

    def make(**kwargs: Any) -> Settings:
        raw = settings_dict(uuid.uuid4().hex[:8], **kwargs)
        settings = Settings.from_dict(raw)
        made.append(settings)
        return settings

    yield make
    if not made:
        return
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for settings in made:
            described = topology.describe(settings)
            for queue in described.queues:
                if queue.name != topology.UNROUTED:
                    channel = await connection.channel()
                    await channel.queue_delete(queue.name)
            for exchange in described.exchanges:
                if exchange.name != topology.UNROUTED:
                    channel = await connection.channel()
                    await channel.exchange_delete(exchange.name)


@pytest.fixture
async def channel() -> AsyncIterator[AbstractChannel]:
    """A channel on the real broker, for a test to inspect or arrange queues."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        yield await connection.channel()
