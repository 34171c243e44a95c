"""relay's wire format: every message relay puts on the broker is built here, and read here.

It is public: services bind queues of their own to the exchange and read these messages
(docs/ARCHITECTURE.md, "The wire contract"). Header names, the envelope, the bucket rule, dead
letters, outcome records and state records live nowhere else.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import aio_pika
import orjson

from relay.providers import Event


class Properties(Protocol):
    """What relay reads of a received message: aio-pika's and aiormq's messages have these."""

    @property
    def headers(self) -> Any: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def timestamp(self) -> datetime | None: ...


# Headers of every webhook message.
SOURCE_HEADER = "x-relay-source"
EVENT_HEADER = "x-relay-event"
KEY_HEADER = "x-relay-key"
# The key's bucket. Not `x-...`: a headers exchange ignores binding arguments that start with x-.
BUCKET_HEADER = "relay-bucket"
REPLAYED_HEADER = "x-relay-replayed"  # on a message sent again: `relay dlq replay` (true), or a
# replay or backfill from the archive (its id)

# The HTTP header of a delivery to a handler: 1 on the first try.
ATTEMPT_HTTP_HEADER = "x-relay-attempt"

# Headers a dead letter adds to the message.
HANDLER_HEADER = "x-relay-handler"
REASON_HEADER = "x-relay-reason"
STATUS_HEADER = "x-relay-status"
ATTEMPTS_HEADER = "x-relay-attempts"
FIRST_ATTEMPT_HEADER = "x-relay-first-attempt"
LAST_ATTEMPT_HEADER = "x-relay-last-attempt"
DEAD_LETTER_HEADERS = (
    HANDLER_HEADER, REASON_HEADER, STATUS_HEADER, ATTEMPTS_HEADER, FIRST_ATTEMPT_HEADER,
    LAST_ATTEMPT_HEADER,
)  # fmt: skip

# Every ordering key falls in one of BUCKETS buckets, a fixed space all processes share: the
# ingress stamps the bucket, and partition i of a handler with N partitions is bound to the
# buckets b with b % N == i. Changing BUCKETS would move keys: it never changes.
BUCKETS = 64


def bucket(key: str) -> int:
    """The bucket of an ordering key: crc32 of its UTF-8 bytes, modulo BUCKETS."""
    return zlib.crc32(key.encode()) % BUCKETS


def partition(bucket: int, partitions: int) -> int:
    """The partition that owns `bucket` when a handler has `partitions` partitions."""
    return bucket % partitions


# --- webhook messages -------------------------------------------------------------------------


def envelope(event: Event, received_at: datetime) -> bytes:
    """The message body; `data` is spliced in exactly as the provider sent it."""
    head = orjson.dumps(
        {
            "id": event.message_id,
            "source": event.source,
            "event": event.name,
            "type": event.type,
            "key": event.key,
            "occurred_at": event.occurred_at,
            "received_at": received_at.isoformat().replace("+00:00", "Z"),
        }
    )
    data: bytes = event.data_json
    return head[:-1] + b',"data":' + data + b"}"


def webhook_headers(event: Event, trace: dict[str, str] | None = None) -> dict[str, str]:
    """The headers of an accepted webhook's message (published by relay.publisher with the
    envelope as body, persistent, `application/json`, `message_id` and `timestamp`); with
    tracing on, `trace`: the W3C `traceparent` (and `tracestate`) of its request span."""
    headers = {
        SOURCE_HEADER: event.source,
        EVENT_HEADER: event.name,
        KEY_HEADER: event.key,
        BUCKET_HEADER: str(bucket(event.key)),
    }
    if trace:
        headers.update(trace)
    return headers


def received_at(body: bytes, message: Properties) -> datetime | None:
    """When relay accepted a webhook message: its envelope's received_at, else (a message relay
    did not build) its AMQP timestamp, else None."""
    try:
        return datetime.fromisoformat(orjson.loads(body)["received_at"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        stamped = message.timestamp
        if stamped is None:
            return None
        return stamped if stamped.tzinfo else stamped.replace(tzinfo=UTC)


def key_of(message: Properties) -> str:
    """The ordering key of a webhook message; its id if it has none (a message relay did not
    build, which then waits for no other)."""
    key = (message.headers or {}).get(KEY_HEADER)
    return key if isinstance(key, str) else f"message:{message.message_id}"


# --- dead letters -----------------------------------------------------------------------------


def dead_letter(
    body: bytes,
    message: Properties,
    *,
    handler: str,
    reason: str,
    status: int | None,
    attempts: int,
    first_attempt: datetime,
) -> aio_pika.Message:
    """The dead letter of `message`: its body and headers, plus why and when it failed."""
    headers = {
        **(message.headers or {}),
        HANDLER_HEADER: handler,
        REASON_HEADER: reason,
        STATUS_HEADER: status or 0,
        ATTEMPTS_HEADER: attempts,
        FIRST_ATTEMPT_HEADER: first_attempt.isoformat(),
        LAST_ATTEMPT_HEADER: datetime.now(UTC).isoformat(),
    }
    headers.pop("x-delivery-count", None)  # the broker's, of the partition queue
    return _copy(body, message, headers)


def replayed(body: bytes, message: Properties) -> aio_pika.Message:
    """A dead letter as it goes back to its handler: the original message, marked replayed (and
    given its bucket, if it was dead-lettered before messages carried one)."""
    headers = {k: v for k, v in (message.headers or {}).items() if k not in DEAD_LETTER_HEADERS}
    headers.pop("x-delivery-count", None)  # the broker's, of the dead-letter queue (each list)
    headers.setdefault(BUCKET_HEADER, str(bucket(key_of(message))))
    return _copy(body, message, {**headers, REPLAYED_HEADER: True})


def replayed_from_archive(body: bytes, message: Properties, replay: str) -> aio_pika.Message:
    """An archived message as a replay sends it to one handler again: unchanged (its body, id
    and timestamp keep the original acceptance time) but for REPLAYED_HEADER, the replay's id."""
    headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-stream")}
    headers.setdefault(BUCKET_HEADER, str(bucket(key_of(message))))
    return _copy(body, message, {**headers, REPLAYED_HEADER: replay})


def moved(body: bytes, message: Properties) -> aio_pika.Message:
    """A message as it moves from one of relay's queues to another, unchanged but for the
    broker's delivery count."""
    headers = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}
    return _copy(body, message, headers)


def _copy(body: bytes, message: Properties, headers: dict[str, Any]) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        timestamp=message.timestamp,
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead letter as `relay dlq list` shows it."""

    id: str
    key: str
    event: str
    reason: str
    status: int
    attempts: int
    first_attempt: str
    last_attempt: str

    @classmethod
    def of(cls, message: Properties) -> DeadLetter:
        headers: dict[str, Any] = dict(message.headers or {})
        return cls(
            id=message.message_id or "?",
            key=str(headers.get(KEY_HEADER, "")),
            event=str(headers.get(EVENT_HEADER, "")),
            reason=str(headers.get(REASON_HEADER, "")),
            status=int(headers.get(STATUS_HEADER) or 0),
            attempts=int(headers.get(ATTEMPTS_HEADER) or 0),
            first_attempt=str(headers.get(FIRST_ATTEMPT_HEADER, "")),
            last_attempt=str(headers.get(LAST_ATTEMPT_HEADER, "")),
        )

    def as_json(self, now: datetime) -> bytes:
        """Its fields and `age`, whole seconds since it was dead-lettered (null if unknown)."""
        age = self.age_seconds(now)
        return orjson.dumps({**asdict(self), "age": None if age is None else round(age)})

    def age_seconds(self, now: datetime) -> float | None:
        """Seconds since the message was dead-lettered."""
        try:
            return (now - datetime.fromisoformat(self.last_attempt)).total_seconds()
        except ValueError:
            return None


# --- outcome records --------------------------------------------------------------------------
#
# Every final outcome of a delivery (delivered, dead-lettered; not a transient failure, not a
# repeat) is appended to the handler's outcome log, the stream relay.<handler>.outcomes, and
# confirmed before the message is acked. One message carries the records of deliveries that
# ended close together: body {"outcomes": [record, ...]}, header x-relay-handler.

DELIVERED, DEAD_LETTERED = "delivered", "dead-lettered"


def outcome_record(
    body: bytes,
    message: Properties,
    *,
    outcome: str,
    handler: str,
    key: str,
    bucket: int,
    partition: str,
    attempts: int,
    status: int | None,
    reason: str | None,
    at: datetime,
) -> dict[str, Any]:
    """The record of a delivery's final outcome (`outcome`: DELIVERED or DEAD_LETTERED, at
    `at`) of the webhook message `body` with `message`'s properties."""
    return {
        "outcome": outcome,
        "handler": handler,
        "id": message.message_id,
        "key": key,
        "bucket": bucket,
        "partition": partition,
        "attempts": attempts,
        "at": _rfc3339(at),
        "received_at": _rfc3339(accepted) if (accepted := received_at(body, message)) else None,
        "status": status,
        "reason": reason,
        "replayed": bool((message.headers or {}).get(REPLAYED_HEADER)),
    }


def outcomes_message(records: list[dict[str, Any]]) -> aio_pika.Message:
    """One message of a handler's outcome log, carrying `records` (all of one handler)."""
    return aio_pika.Message(
        orjson.dumps({"outcomes": records}),
        headers={HANDLER_HEADER: records[0]["handler"]},
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def read_outcomes(body: bytes) -> list[dict[str, Any]]:
    """The outcome records a message of an outcome log carries; [] if it is not one."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    records = fields.get("outcomes") if isinstance(fields, dict) else None
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict) and "outcome" in r and "id" in r]


def _rfc3339(at: datetime) -> str:
    """UTC, with microseconds, `Z`: 2026-11-28T12:00:00.123456Z."""
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- state records ----------------------------------------------------------------------------


class State(StrEnum):
    """A handler's state in a worker: delivering, retrying some messages, or parked."""

    LIVE = "live"
    RETRYING = "retrying"
    PARKED = "parked"


def state_record(
    *,
    handler: str,
    partition: str,
    state: str,
    detail: str,
    worker: str,
    rate: float | None = None,
) -> aio_pika.Message:
    """A handler state change, or a large step of its rate (deliveries per second across the
    cluster as `worker` applies it; None: unlimited), appended to the relay.state stream."""
    return _record(
        {"kind": "state", "handler": handler, "partition": partition, "state": state,
         "detail": detail, "worker": worker, "rate": rate}
    )  # fmt: skip


def layout_record(*, handler: str, partitions: int, change: str) -> aio_pika.Message:
    """A handler's partitions were laid out anew (`relay topology declare`, or a worker creating
    a new handler's): workers consume every partition of every layout still on the broker."""
    return _record(
        {"kind": "layout", "handler": handler, "partitions": partitions, "change": change}
    )


def release_record(
    *, handler: str, change: str, buckets: list[int], duplicates: list[str]
) -> aio_pika.Message:
    """Every message of `buckets` routed to their old partition before `change` has its final
    outcome: their new partition may deliver them. `duplicates` were routed to both partitions
    while the change was made, and were delivered from the old one."""
    return _record(
        {"kind": "release", "handler": handler, "change": change, "buckets": buckets,
         "duplicates": duplicates}
    )  # fmt: skip


def replay_record(
    *,
    handler: str,
    replay: str,
    since: str,
    until: str | None,
    keys: list[str],
    events: list[str],
    before: str,
    fill: str,
    after: str,
) -> aio_pika.Message:
    """A replay (or backfill) of archived messages to one handler begins (relay/replays.py).

    Its changes: `before` is released once each partition has done the messages it held when
    the replay's marker reached it; `fill` once the replay queue holds every archived message
    of the replay (only then, and after `before`, does it deliver them); `after` once the replay
    queue is done: the partitions then deliver what arrived after their marker."""
    return _record(
        {"kind": "replay", "handler": handler, "replay": replay, "since": since, "until": until,
         "keys": keys, "events": events, "before": before, "fill": fill, "after": after}
    )  # fmt: skip


def marked_record(*, handler: str, replay: str) -> aio_pika.Message:
    """The replay's markers are in every partition of its handler (its `at` counts)."""
    return _record({"kind": "marked", "handler": handler, "replay": replay})


def attempt_record(*, handler: str, replay: str, attempt: int, queue: str) -> aio_pika.Message:
    """A filling of the replay's queue begins: workers consume `queue`, and no longer the
    queues of earlier attempts (deleted: their messages were never delivered)."""
    return _record(
        {"kind": "attempt", "handler": handler, "replay": replay, "attempt": attempt,
         "queue": queue}
    )  # fmt: skip


def _record(body: dict[str, Any]) -> aio_pika.Message:
    return aio_pika.Message(
        orjson.dumps({**body, "at": datetime.now(UTC).isoformat()}),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def read_record(body: bytes) -> dict[str, Any] | None:
    """The fields of a record of the relay.state stream (`kind`: state, layout or release), or
    None if `body` is not one."""
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or "handler" not in record:
        return None
    record.setdefault("kind", "state")  # records written before kinds
    return record


# --- partition change markers -----------------------------------------------------------------
#
# Changing a handler's partitions moves buckets from old partitions to new ones. So that a key's
# older messages, still in its old partition, are delivered before its newer ones, `relay
# topology declare` puts markers into the partition queues (docs/ARCHITECTURE.md, "Changing
# partitions"): HOLD into a partition gaining buckets before they are routed to it (it holds
# their messages), FENCE_START and then FENCE into a partition losing buckets, around the
# switch of bindings (when the FENCE has passed, the buckets are released).

#
# A replay from the archive (relay/replays.py) puts REPLAY into each of the handler's
# partitions: a FENCE of its `before` change and a HOLD of its `after` change at one point of the
# queue. Its replay queue starts with a HOLD of its `fill` change and ends with a FENCE of
# `after` that lists the ids (`ids`) it delivered that may also be held in the partitions. CUT
# goes into the archive: where a replay stops reading.

MARKER_HEADER = "x-relay-marker"
HOLD, FENCE_START, FENCE, REPLAY, CUT = "hold", "fence-start", "fence", "replay", "cut"


@dataclass(frozen=True, slots=True)
class Marker:
    kind: str  # HOLD | FENCE_START | FENCE | REPLAY
    change: str  # REPLAY: the change that holds what arrives after it
    buckets: frozenset[int]
    before: str = ""  # REPLAY: the change fenced by what arrived before it
    ids: frozenset[str] = frozenset()  # FENCE: messages delivered before it, held elsewhere


def marker(
    kind: str, change: str, buckets: list[int], *, before: str = "", ids: Iterable[str] = ()
) -> aio_pika.Message:
    fields: dict[str, Any] = {"change": change, "buckets": sorted(buckets)}
    if before:
        fields["before"] = before
    if ids:
        fields["ids"] = sorted(ids)
    return aio_pika.Message(
        orjson.dumps(fields),
        headers={MARKER_HEADER: kind},
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=f"marker:{change}:{kind}",
    )


def read_marker(headers: dict[str, Any], body: bytes) -> Marker | None:
    """The marker a message is, or None if it is not one (nor a partition's: CUT)."""
    kind = headers.get(MARKER_HEADER)
    if kind not in (HOLD, FENCE_START, FENCE, REPLAY):
        return None
    fields = orjson.loads(body)
    return Marker(
        kind,
        str(fields["change"]),
        frozenset(int(b) for b in fields["buckets"]),
        str(fields.get("before", "")),
        frozenset(str(i) for i in fields.get("ids", ())),
    )


def cut(replay: str) -> aio_pika.Message:
    """The end of what a replay reads of the archive."""
    return aio_pika.Message(
        b"{}",
        headers={MARKER_HEADER: CUT},
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=f"cut:{replay}",
    )


def is_marker(message: Properties) -> bool:
    return MARKER_HEADER in (message.headers or {})


# --- routing ----------------------------------------------------------------------------------


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding `pattern` matches `routing_key`, as RabbitMQ decides: both split
    into words on '.' (an empty string has none; an empty word is a word), `*` matches exactly
    one word, `#` zero or more, any other word only itself."""
    words = routing_key.split(".") if routing_key else []
    ends = {0}  # how many words of the key the pattern's words so far can match
    for word in pattern.split(".") if pattern else []:
        if word == "#":
            ends = set(range(min(ends), len(words) + 1))
        else:
            ends = {i + 1 for i in ends if i < len(words) and word in ("*", words[i])}
        if not ends:
            return False
    return len(words) in ends


def bucket_of(headers: dict[str, Any], key: str) -> int:
    """A message's bucket: its header, or (a message from before buckets) its key's."""
    stamped = headers.get(BUCKET_HEADER)
    if isinstance(stamped, str) and stamped.isdigit():
        return int(stamped) % BUCKETS
    return bucket(key)
