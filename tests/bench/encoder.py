"""What relay/amqp.py's hand-written encoder buys over pamqp: CPU per publish, in-process.

    python -m tests.bench.encoder [--publishes 20000] [--runs 7] [--batch 50]

Both ways encode the same publishes of the ingress (an Envoice `paid` webhook's envelope, its
four routing headers, persistent, mandatory, JSON, message id and timestamp; frame_max 131072)
and join each `--batch` of them into one write, as relay/publisher.py's outbox does:

- relay: `amqp.Publish.frames`, what the ingress runs;
- pamqp: `Basic.Publish`, `Basic.Properties`, `ContentHeader` and `ContentBody` marshalled by
  `pamqp.frame.marshal`, what aiormq's `basic_publish` does for each message (without the rest
  of `basic_publish`: its futures, lock and write-queue item are not counted).

The bytes are checked equal first. Printed: microseconds of CPU (process time) per publish each
way, medians of the runs, their ratio and difference, and the difference as a share of the
ingress's CPU per request (INGRESS_US).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import cast

import orjson
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.common import FieldTable
from pamqp.header import ContentHeader

from relay import amqp, wire
from relay.providers import Event
from tests.support import activity

EXCHANGE = "relay.activities"
FRAME_MAX = 131072
# The ingress's CPU per request, us: about 100-120 on this machine; 117 and 127 in
# docs/OPERATIONS.md ("Cost" of the archive), 146 in docs/PERFORMANCE.md's table.
INGRESS_US = (100.0, 120.0, 146.0)

Publish = tuple[bytes, str, str, datetime, dict[str, str]]  # body, routing key, id, time, headers


def publishes(count: int) -> list[Publish]:
    received_at = datetime.now(UTC)
    out: list[Publish] = []
    for i in range(count):
        data = activity(Id=i, InvoiceId=i % 1000, InvoiceNumber=f"INV-{i}")
        event = Event(
            id=str(i), source="envoice", name="paid", type=3, key=f"invoice:{i % 1000}",
            occurred_at=received_at.isoformat(), data=data, data_json=orjson.dumps(data),
        )  # fmt: skip
        body = wire.envelope(event, received_at)
        out.append(
            (body, event.routing_key, event.message_id, received_at, wire.webhook_headers(event))
        )
    return out


FRAMES = amqp.Publish(1, FRAME_MAX, EXCHANGE)  # one a channel, as relay/publisher.py


def by_relay(batch: list[Publish]) -> bytes:
    return b"".join(
        FRAMES.frames(
            body, routing_key=key, message_id=mid, timestamp=int(at.timestamp()), headers=headers
        )
        for body, key, mid, at, headers in batch
    )


def by_pamqp(batch: list[Publish]) -> bytes:
    chunk = FRAME_MAX - amqp.FRAME_OVERHEAD
    marshal = pamqp_frame.marshal
    parts: list[bytes] = []
    for body, key, mid, at, headers in batch:
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=mid,
            timestamp=at,
            headers=cast(FieldTable, headers),  # of str: a FieldTable
        )
        parts.append(marshal(Basic.Publish(exchange=EXCHANGE, routing_key=key, mandatory=True), 1))
        parts.append(marshal(ContentHeader(0, len(body), properties), 1))
        for start in range(0, len(body), chunk):
            parts.append(marshal(ContentBody(body[start : start + chunk]), 1))
    return b"".join(parts)


def one_run(encode: Callable[[list[Publish]], bytes], batches: list[list[Publish]]) -> float:
    """Microseconds of CPU per publish."""
    gc.collect()
    count = sum(len(b) for b in batches)
    started = time.process_time()
    for batch in batches:
        encode(batch)
    return (time.process_time() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=50, help="publishes joined into one write")
    args = parser.parse_args()

    all_publishes = publishes(args.publishes)
    batches = [all_publishes[i : i + args.batch] for i in range(0, len(all_publishes), args.batch)]
    for batch in batches[:3]:
        assert by_relay(batch) == by_pamqp(batch), "the two ways encode differently"

    relay_us: list[float] = []
    pamqp_us: list[float] = []
    for _ in range(args.runs):  # alternated, so drift on a shared machine hits both
        relay_us.append(one_run(by_relay, batches))
        pamqp_us.append(one_run(by_pamqp, batches))
    relay, pamqp = statistics.median(relay_us), statistics.median(pamqp_us)
    saved = pamqp - relay
    shares = ", ".join(f"{saved / us * 100:.1f}% of {us:.0f} us" for us in INGRESS_US)
    body = statistics.median(len(p[0]) for p in all_publishes)
    print(
        f"{args.publishes} publishes (body {body:.0f} bytes), batches of {args.batch}, "
        f"medians of {args.runs} runs, CPU us per publish:\n"
        f"  relay/amqp.py  {relay:6.2f}  (runs {', '.join(f'{u:.2f}' for u in relay_us)})\n"
        f"  pamqp          {pamqp:6.2f}  (runs {', '.join(f'{u:.2f}' for u in pamqp_us)})\n"
        f"  pamqp/relay {pamqp / relay:.1f}x; relay saves {saved:.1f} us a publish: {shares} "
        "(the ingress's CPU per request)"
    )


if __name__ == "__main__":
    main()
