"""`relay trace ID` and `relay trace --key K [--last N]`: a webhook's journey, read from the
archive and the handlers' outcome logs. It only reads: it publishes nothing, anywhere.

- Accepted: the archive (relay.archive) holds each webhook as the broker confirmed it: when
  (its envelope's received_at), by which source (x-relay-source), its routing key (the event)
  and its ordering key. One archive serves a vhost: only messages published to the config's
  exchange count, as for `relay replay`.
- Bound: the handlers of the config whose bindings match its routing key (wire.topic_matches),
  as the config says today.
- Per bound handler, its outcome log (relay.<handler>.outcomes): the first record of the id not
  marked replayed is its final outcome, delivered (when, after how many attempts) or
  dead-lettered (reason, status); records marked replayed follow it as its replays. No record:
  pending, in the partition its bucket maps to today, behind the earlier webhooks of its key in
  the archive that the handler binds and has no record of. The partition queues are never
  looked into (basic.get on a quorum queue reorders what it puts back).

How far back: the archive reads at roughly 2,000 messages/s (AMQP 0.9.1), so a trace reads it
from `--since` (default SINCE, the syntax of `relay replay --since`), not from its first
message, and says "not found in the archive since T" (and how far back the archive reaches, if
retention dropped older) when the webhook is not there. `trace ID` stops reading at the id.
Only a pending webhook needs the earlier webhooks of its key: a second read of the archive, from
`--since` up to it (so `behind` counts those accepted since then). `trace --key` reads to the
end once and keeps the key's webhooks.

Outcome logs: a message's records are written after it was accepted, so each log is read from
the earliest acceptance wanted, less MARGIN (clocks of ingress and broker hosts differ, and a
time offset starts at a whole second's chunk).

Where a read ends: at the newest message a stream held when the trace began, found without
writing anything (relay/streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aio_pika.abc import AbstractConnection

from relay import replays, topology, wire
from relay.broker import connect
from relay.errors import NotFound
from relay.settings import HandlerSettings, Settings
from relay.streams import Entry, read_stream, stream_end

PENDING = "pending"
SINCE = "24h"  # how far back the archive is searched by default
LAST = 10  # `--key`: the last this many webhooks of the key
MARGIN = timedelta(seconds=replays.SKEW_SECONDS + 1)  # outcome logs read from acceptance less this
ARCHIVE_MISSING = "the archive is off ([archive] enabled = false) or not declared yet"


# --- a journey, from what was read ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Webhook:
    """A webhook as the archive holds it."""

    id: str
    source: str
    event: str  # its routing key
    key: str  # its ordering key
    bucket: int
    accepted_at: datetime
    offset: int  # in the archive: acceptance order

    @classmethod
    def of(cls, entry: Entry) -> Webhook:
        headers: dict[str, Any] = dict(entry.properties.headers or {})
        envelope = _envelope(entry.body)
        key = wire.key_of(entry.properties)
        return cls(
            id=entry.properties.message_id or str(envelope.get("id", "")),
            source=str(headers.get(wire.SOURCE_HEADER) or envelope.get("source") or ""),
            event=entry.routing_key,
            key=key,
            bucket=wire.bucket_of(headers, key),
            accepted_at=wire.received_at(entry.body, entry.properties) or replays.EPOCH,
            offset=entry.offset,
        )

    def bound_by(self, handler: HandlerSettings) -> bool:
        return any(wire.topic_matches(pattern, self.event) for pattern in handler.bindings)


def _envelope(body: bytes) -> dict[str, Any]:
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return fields if isinstance(fields, dict) else {}


@dataclass(frozen=True, slots=True)
class Recorded:
    """A final outcome as the handler's outcome log has it (wire.outcome_record)."""

    state: str  # delivered | dead-lettered
    at: str
    attempts: int
    status: int | None
    reason: str | None
    partition: str

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Recorded:
        return cls(
            state=str(record.get("outcome")),
            at=str(record.get("at")),
            attempts=int(record.get("attempts") or 0),
            status=record.get("status"),
            reason=record.get("reason"),
            partition=str(record.get("partition") or ""),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "at": self.at, "attempts": self.attempts,
                "status": self.status, "reason": self.reason}  # fmt: skip

    def describe(self) -> str:
        tries = f"after {self.attempts} attempt{'' if self.attempts == 1 else 's'}"
        if self.state == wire.DELIVERED:
            return f"{self.at} {tries} ({self.partition})"
        return f"{self.at} {tries}: {self.reason} (status {self.status})"


_FINAL_FIELDS = ("at", "attempts", "status", "reason")


@dataclass(frozen=True, slots=True)
class Leg:
    """A webhook's way to one handler that binds it."""

    name: str
    state: str  # delivered | dead-lettered | pending
    partition: str  # where it was delivered from, or waits
    final: Recorded | None = None  # delivered or dead-lettered: how
    behind: int | None = None  # pending: earlier webhooks of its key with no final outcome yet
    replays: tuple[Recorded, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        final = self.final.as_dict() if self.final else dict.fromkeys(_FINAL_FIELDS)
        return {
            "name": self.name,
            "state": self.state,
            **{name: final[name] for name in _FINAL_FIELDS},
            "partition": self.partition,
            "behind": self.behind,
            "replays": [r.as_dict() for r in self.replays],
        }


@dataclass(frozen=True, slots=True)
class Journey:
    webhook: Webhook
    legs: tuple[Leg, ...]

    def as_dict(self) -> dict[str, Any]:
        w = self.webhook
        return {"id": w.id, "source": w.source, "event": w.event, "key": w.key,
                "accepted_at": _rfc3339(w.accepted_at),
                "handlers": [leg.as_dict() for leg in self.legs]}  # fmt: skip

    def render(self) -> str:
        w = self.webhook
        lines = [
            f"{w.id} accepted {_rfc3339(w.accepted_at)} from source {w.source}",
            f"  event {w.event}, key {w.key}",
        ]
        if not self.legs:
            lines.append(f"  no handler of the config binds {w.event}")
        width = max((len(leg.name) for leg in self.legs), default=0)
        for leg in self.legs:
            if leg.final is not None:
                lines.append(f"  {leg.name:<{width}}  {leg.state:<13}  {leg.final.describe()}")
            else:
                lines.append(f"  {leg.name:<{width}}  {leg.state:<13}  in {leg.partition}, "
                             f"{_behind(leg.behind)}")  # fmt: skip
            for again in leg.replays:
                lines.append(f"  {'':<{width}}  replayed: {again.state}  {again.describe()}")
        return "\n".join(lines)


def _behind(count: int | None) -> str:
    if count is None:
        return "behind ? earlier webhooks of its key"
    return f"behind {count} earlier webhook{'' if count == 1 else 's'} of its key"


def journey(
    webhook: Webhook,
    handlers: Iterable[HandlerSettings],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    history: Sequence[Webhook] | None,
) -> Journey:
    """`webhook`'s journey to each of `handlers` that binds it, from `records` (per handler name,
    its outcome records in log order) and `history` (webhooks of its key in archive order; None:
    not read, and a pending leg's `behind` is unknown)."""
    legs = (
        leg(webhook, h, records.get(h.name, ()), history) for h in handlers if webhook.bound_by(h)
    )
    return Journey(webhook, tuple(legs))


def leg(
    webhook: Webhook,
    handler: HandlerSettings,
    records: Sequence[Mapping[str, Any]],
    history: Sequence[Webhook] | None,
) -> Leg:
    """The first record of the webhook's id not marked replayed is its final outcome; the
    replayed ones follow; with no final outcome it is pending in its partition."""
    mine = [r for r in records if r.get("id") == webhook.id]
    final = next((Recorded.of(r) for r in mine if not r.get("replayed")), None)
    again = tuple(Recorded.of(r) for r in mine if r.get("replayed"))
    if final is not None:
        return Leg(handler.name, final.state, final.partition, final, replays=again)
    partition = handler.queue(wire.partition(webhook.bucket, handler.partitions))
    behind = None if history is None else waiting_before(webhook, handler, records, history)
    return Leg(handler.name, PENDING, partition, behind=behind, replays=again)


def waiting_before(
    webhook: Webhook,
    handler: HandlerSettings,
    records: Sequence[Mapping[str, Any]],
    history: Sequence[Webhook],
) -> int:
    """How many webhooks of its key, accepted before it and bound by `handler`, have no record
    in the handler's outcome log (each id once: a repeat is the same webhook)."""
    ended = {r.get("id") for r in records}
    return len(
        {
            w.id
            for w in history
            if w.offset < webhook.offset
            and w.key == webhook.key
            and w.id != webhook.id
            and w.id not in ended
            and w.bound_by(handler)
        }
    )


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- the trace commands -----------------------------------------------------------------------


async def trace_id(settings: Settings, message_id: str, since: datetime) -> Journey:
    """The journey of the webhook `message_id` accepted since `since` (its first copy, if the
    archive holds it twice); NotFound if the archive has none."""
    connection = await connect(settings.broker)
    async with connection:
        end = await stream_end(connection, topology.ARCHIVE, ARCHIVE_MISSING)
        found = None
        if end is not None:
            async with contextlib.aclosing(_archived(connection, settings, since, end)) as read:
                found = await anext((w async for w in read if w.id == message_id), None)
        if found is None:
            raise NotFound(await _not_found(connection, message_id, since))
        target = found

        async def history() -> list[Webhook]:
            return await _of_key(connection, settings, target.key, since, target.offset)

        [traced] = await _journeys(connection, settings, [target], history)
        return traced


async def trace_key(settings: Settings, key: str, since: datetime, last: int) -> list[Journey]:
    """The journeys of the last `last` webhooks of ordering key `key` accepted since `since`, in
    acceptance order; NotFound if the archive has none."""
    connection = await connect(settings.broker)
    async with connection:
        end = await stream_end(connection, topology.ARCHIVE, ARCHIVE_MISSING)
        history = [] if end is None else await _of_key(connection, settings, key, since, end)
        if not history:
            raise NotFound(await _not_found(connection, f"key {key}", since))

        async def read() -> list[Webhook]:
            return history

        return await _journeys(connection, settings, history[-last:], read)


async def _journeys(
    connection: AbstractConnection,
    settings: Settings,
    targets: list[Webhook],
    history: Callable[[], Awaitable[list[Webhook]]],
) -> list[Journey]:
    """Their journeys: outcome logs read from the targets' acceptance; for handlers where one
    is pending, again from the acceptance of the earlier webhooks of its key (`history`)."""
    bound = [h for h in settings.handlers if any(t.bound_by(h) for t in targets)]
    records = await _outcomes(connection, bound, targets)
    traced = [journey(t, settings.handlers, records, None) for t in targets]
    pending = {leg.name for j in traced for leg in j.legs if leg.state == PENDING}
    if not pending:
        return traced
    earlier = [w for w in await history() if w.offset <= targets[-1].offset]
    waiting = [h for h in bound if h.name in pending]
    records = {**records, **await _outcomes(connection, waiting, [*earlier, *targets])}
    return [journey(t, settings.handlers, records, earlier) for t in targets]


async def _outcomes(
    connection: AbstractConnection, handlers: Sequence[HandlerSettings], webhooks: list[Webhook]
) -> dict[str, list[dict[str, Any]]]:
    """Per handler, the records of its outcome log of `webhooks` it binds, in log order."""

    async def of(handler: HandlerSettings) -> list[dict[str, Any]]:
        bound = [w for w in webhooks if w.bound_by(handler)]
        ids = {w.id for w in bound}
        start = max(min(w.accepted_at for w in bound) - MARGIN, replays.EPOCH)
        log = handler.outcome_log
        missing = f"run `relay topology declare`, or start a worker of handler {handler.name!r}"
        end = await stream_end(connection, log, missing)
        if end is None:
            return []
        found: list[dict[str, Any]] = []
        async with contextlib.aclosing(read_stream(connection, log, start, end)) as entries:
            async for entry in entries:
                found += [r for r in wire.read_outcomes(entry.body) if r["id"] in ids]
        return found

    read = await asyncio.gather(*(of(h) for h in handlers))
    return {h.name: records for h, records in zip(handlers, read, strict=True)}


async def _of_key(
    connection: AbstractConnection, settings: Settings, key: str, since: datetime, end: int
) -> list[Webhook]:
    """The webhooks of ordering key `key` in the archive from `since` up to offset `end`, in
    archive order, each id once (its first copy)."""
    found: dict[str, Webhook] = {}
    async with contextlib.aclosing(_archived(connection, settings, since, end)) as read:
        async for webhook in read:
            if webhook.key == key and webhook.offset <= end:
                found.setdefault(webhook.id, webhook)
    return list(found.values())


async def _archived(
    connection: AbstractConnection, settings: Settings, since: datetime, end: int
) -> AsyncGenerator[Webhook, None]:
    """The archive's webhooks published to the config's exchange, from about `since` (a time
    offset starts at a chunk, and clocks differ: from SKEW_SECONDS earlier) to offset `end`."""
    start = max(since - timedelta(seconds=replays.SKEW_SECONDS), replays.EPOCH)
    exchange = settings.broker.exchange
    async with contextlib.aclosing(read_stream(connection, topology.ARCHIVE, start, end)) as read:
        async for entry in read:
            if entry.exchange == exchange and not wire.is_marker(entry.properties):
                yield Webhook.of(entry)


async def _not_found(connection: AbstractConnection, what: str, since: datetime) -> str:
    said = f"{what} not found in the archive since {_rfc3339(since)}"
    reach = await replays.archive_reach(connection)
    if reach is not None and reach > since:
        said += f" (it reaches back to {_rfc3339(reach)} only)"
    return said
