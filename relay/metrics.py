"""Prometheus metrics: requests, publishes, deliveries, end-to-end latency and its waits,
handler states, queue depths, broker blocks."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by `relay ingress --processes N`

REQUESTS = Counter(
    "relay_ingress_requests_total", "Webhook requests answered, by source and status (an HTTP "
    "status; `shed`: 503 at once, max_accept_queue connections waiting or max_in_flight publishes "
    "in flight; "
    "`client_closed`)",
    ["source", "status"],
)  # fmt: skip
SHED = "shed"  # the status label of webhooks shed (answered 503 unpublished): not a broker 503
# Both summed over the processes of `relay ingress --processes N`, so the two compare
PUBLISHES_IN_FLIGHT = Gauge(
    "relay_ingress_publishes_in_flight", "Publishes awaiting the broker's confirm",
    multiprocess_mode="livesum",
)  # fmt: skip
MAX_IN_FLIGHT = Gauge(
    "relay_ingress_max_in_flight", "The bound on publishes in flight (ingress.max_in_flight)",
    multiprocess_mode="livesum",
)  # fmt: skip
ACCEPT_QUEUE = Gauge(
    "relay_ingress_accept_queue", "Connections waiting to be accepted, last read",
    multiprocess_mode="livesum",
)  # fmt: skip
MAX_ACCEPT_QUEUE = Gauge(
    "relay_ingress_max_accept_queue",
    "The accept queue beyond which new webhooks are shed (ingress.max_accept_queue)",
    multiprocess_mode="livesum",
)  # fmt: skip
PUBLISH_SECONDS = Histogram(
    "relay_publish_seconds", "Time from publish to broker confirm",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)  # fmt: skip
DELIVERIES = Counter(
    "relay_deliveries_total", "Delivery attempts, by handler and outcome", ["handler", "outcome"]
)
DELIVERY_SECONDS = Histogram(
    "relay_delivery_seconds", "Duration of one delivery attempt", ["handler"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
# End to end, a webhook takes well under a second when all is well, tens of seconds through
# retries (the default backoff waits about 64 s over 8 attempts), and minutes to hours when it
# waits out a handler's outage or a backlog behind it: buckets from 50 ms to a day, with 300 s
# (the alert EndToEndLatencyHigh) a bound so that its quantile is not interpolated across it
END_TO_END_SECONDS = Histogram(
    "relay_end_to_end_seconds", "Time from the ingress accepting a webhook (its received_at) to "
    "its final outcome for a handler, recorded in the handler's outcome log; by handler and "
    "outcome (delivered, dead-lettered). Messages sent again on purpose (replays, `relay dlq "
    "replay`) are not counted", ["handler", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200,
             21600, 86400),
)  # fmt: skip
# Most messages are their key's head at once (0); behind another, a message waits its delivery
# (milliseconds), its retries (seconds to a minute) or its handler's outage (up to hours)
KEY_WAIT_SECONDS = Histogram(
    "relay_key_wait_seconds", "Time a message waited in a worker's window behind older "
    "messages of its key (their deliveries and retries) before it was its key's next",
    ["handler"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)  # fmt: skip
# A park lasts at least one probe interval (backoff_max_ms: a second to a minute), an outage
# up to hours
PARKED_SECONDS = Histogram(
    "relay_parked_seconds", "How long a handler stayed parked in a worker, observed when a "
    "probe succeeds", ["handler"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)  # fmt: skip
REPEATS = Counter(
    "relay_repeats_total", "Copies of a message whose outcome was already recorded, acked "
    "without delivery, by handler", ["handler"],
)  # fmt: skip
REMEMBERED = Gauge(
    "relay_remembered_ids", "Ids remembered within the repeats horizon: accepted (ingress) or "
    "decided per handler (worker)", ["of"],
)  # fmt: skip
QUEUE_DEPTH = Gauge("relay_queue_messages", "Messages ready in a relay queue", ["queue"])
HANDLER_STATE = Gauge(
    "relay_handler_state", "1 for the handler's current state in this worker, else 0",
    ["handler", "state"],
)  # fmt: skip
HANDLER_RATE = Gauge(
    "relay_handler_rate", "The handler's delivery rate as this worker applies it, in deliveries "
    "per second across the cluster (max_rate, backed off on 429, 503 or rising latency); 0: "
    "no limit", ["handler"],
)  # fmt: skip

BROKER_BLOCKED = Gauge(
    "relay_broker_blocked", "1 while the broker blocks this process's publishing connection "
    "(a memory or disk alarm), by component (publisher: the ingress; worker)", ["component"],
    multiprocess_mode="livemax",
)  # fmt: skip


def exposition() -> bytes:
    """The metrics in Prometheus' text format: this process's, or, when several ingress
    processes share a port (MULTIPROCESS_ENV set), all of theirs summed, whichever one is asked."""
    if MULTIPROCESS_ENV not in os.environ:
        return generate_latest()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
