"""The worker: consumes handlers' partitions and delivers each key's messages in order.

- `worker`: the process: connection, topology, partitions, shutdown;
- `partition`: one partition queue's window of deliveries, queued per key (AMQP shell);
- `scheduler`: one handler's deliveries in flight, retries and state;
- `outcomes`: the handler's outcome log, written in group commits before each ack;
- `decided`: the ids the outcome log records, so that a repeat is acked without delivery;
- `keys` and `policy`: the scheduling and retry/park decisions, plain code;
- `delivery`: one delivery over HTTP or to a Python callable, and its outcome.
"""

from relay.worker.worker import Worker

__all__ = ["Worker"]
