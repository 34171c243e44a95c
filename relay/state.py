"""Handler state (live, retrying, parked), recorded where operators and `relay status` see it.

Each partition's state changes are appended to the stream `relay.state` (a stream, not a
quorum queue: readers must not consume the records, and a stream keeps them for every reader).
"""

from __future__ import annotations

import asyncio
import os
import socket
from enum import StrEnum
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from relay import wire
from relay.topology import STATE_STREAM

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class State(StrEnum):
    LIVE = "live"
    RETRYING = "retrying"
    PARKED = "parked"


def record(handler: str, partition: str, state: State, detail: str) -> aio_pika.Message:
    return wire.state_record(
        handler=handler, partition=partition, state=state.value, detail=detail, worker=WORKER_ID
    )


async def latest(channel: AbstractChannel, idle_seconds: float = 0.5) -> dict[str, dict[str, Any]]:
    """The latest record per partition, read from the start of the stream until it goes idle."""
    found: dict[str, dict[str, Any]] = {}
    arrived = asyncio.Event()

    async def on_record(incoming: AbstractIncomingMessage) -> None:
        entry = wire.read_state_record(incoming.body)
        if entry is not None:
            found[entry["partition"]] = entry
        arrived.set()
        await incoming.ack()

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
