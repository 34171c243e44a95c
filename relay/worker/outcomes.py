"""A handler's outcome log in one worker: final delivery outcomes appended to its stream,
relay.<handler>.outcomes, each confirmed before its message is acked.

Group commit: a record waits in a batch; the one writer publishes the batch as one message and
hands the broker's confirm (or the error) to every record in it. While a publish is in flight
the next batch grows, so under load a publish carries many records, and alone a record goes at
once (the writer waits for nothing but the end of the current loop iteration). A batch holds at
most the handler's deliveries in flight (`concurrency`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import structlog

from relay import wire

log = structlog.get_logger()

Publish = Callable[[aio_pika.Message, str], Awaitable[None]]  # (message, queue): confirmed


class OutcomeLog:
    def __init__(self, queue: str) -> None:
        self.queue = queue
        self._batch: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._publish: Publish | None = None
        self._writer: asyncio.Task[None] | None = None

    async def write(self, record: dict[str, Any]) -> None:
        """Append `record` (wire.outcome_record); return once the broker confirmed it, or raise
        what the publish raised."""
        if self._writer is None or self._writer.done():
            raise ConnectionError("the outcome log is not writing (no broker session)")
        confirmed = asyncio.get_running_loop().create_future()
        self._batch.append((record, confirmed))
        self._wake.set()
        await confirmed

    def start(self, publish: Publish) -> None:
        self._publish = publish
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def stop(self) -> None:
        """Stop writing: records not confirmed yet fail (their messages are not acked)."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        batch, self._batch = self._batch, []
        _settle(batch, ConnectionError("the outcome log stopped"))

    async def _write(self) -> None:
        batch: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        try:
            while True:
                await self._wake.wait()
                await asyncio.sleep(0)  # records of deliveries ending in this iteration join
                self._wake.clear()
                batch, self._batch = self._batch, []
                if not batch:
                    continue
                assert self._publish is not None
                try:
                    await self._publish(wire.outcomes_message([r for r, _ in batch]), self.queue)
                except Exception as exc:
                    _settle(batch, exc)
                else:
                    # (debug: which ids the broker confirmed, when; what a cluster run checks a
                    # record missing at its end against: confirmed, or never)
                    log.debug("outcome records confirmed", stream=self.queue,
                              ids=[str(r["id"]) for r, _ in batch])  # fmt: skip
                    _settle(batch, None)
                batch = []
        finally:
            _settle(batch, ConnectionError("the outcome log stopped"))


def _settle(
    batch: list[tuple[dict[str, Any], asyncio.Future[None]]], error: BaseException | None
) -> None:
    for _, confirmed in batch:
        if confirmed.done():
            continue
        if error is None:
            confirmed.set_result(None)
        else:
            confirmed.set_exception(error)
