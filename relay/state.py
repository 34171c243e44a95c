"""Handler state (live, retrying, parked), recorded where operators and `relay status` see it.

Each partition's state changes are appended to the stream `relay.state` (a stream, not a
quorum queue: readers must not consume the records, and a stream keeps them for every reader).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

STATE_STREAM = "relay.state"
STREAM_ARGUMENTS: dict[str, Any] = {"x-queue-type": "stream", "x-max-age": "7D"}
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class State(StrEnum):
    LIVE = "live"
    RETRYING = "retrying"
    PARKED = "parked"


def record(handler: str, partition: str, state: State, detail: str) -> aio_pika.Message:
    body = {
        "handler": handler,
        "partition": partition,
        "state": state.value,
        "detail": detail,
        "worker": WORKER_ID,
        "at": datetime.now(UTC).isoformat(),
    }
    return aio_pika.Message(
        orjson.dumps(body),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def latest(channel: AbstractChannel, idle_seconds: float = 0.5) -> dict[str, dict[str, Any]]:
    """The latest record per partition, read from the start of the stream until it goes idle."""
    found: dict[str, dict[str, Any]] = {}
    arrived = asyncio.Event()

    async def on_record(message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(ValueError):
            entry = orjson.loads(message.body)
            found[entry["partition"]] = entry
        arrived.set()
        await message.ack()

    await channel.set_qos(prefetch_count=500)  # a stream consumer needs a prefetch
    queue = await channel.get_queue(STATE_STREAM, ensure=False)
    tag = await queue.consume(on_record, arguments={"x-stream-offset": "first"})
    while True:
        arrived.clear()
        try:
            await asyncio.wait_for(arrived.wait(), idle_seconds)
        except TimeoutError:
            break
    await queue.cancel(tag)
    return found
