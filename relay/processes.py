"""`relay ingress --processes N`: N ingress processes on one port, so that one machine's ingress
uses all its cores.

The parent starts N `relay ingress --reuse-port` children: the kernel spreads new connections
over them (SO_REUSEPORT), each has its own broker connection and duplicate window, and their
metrics are summed through prometheus_client's multiprocess mode, so /metrics is whole whichever
child answers. A stop signal reaches every child, which drains and exits; if a child exits on
its own, the parent stops the others and exits with that child's code, for the service manager
to restart the whole (the same contract as one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile

import structlog

from relay.metrics import MULTIPROCESS_ENV

log = structlog.get_logger()


async def supervise(count: int, argv: list[str], stopping: asyncio.Event) -> int:
    """Run `count` children `python -m relay ARGV` until `stopping` is set or one exits; stop
    them all; the exit code: the first child's to exit on its own, else the worst of them."""
    with tempfile.TemporaryDirectory(prefix="relay-metrics-") as metrics:
        env = {**os.environ, MULTIPROCESS_ENV: metrics}
        children = [
            await asyncio.create_subprocess_exec(sys.executable, "-m", "relay", *argv, env=env)
            for _ in range(count)
        ]
        log.info("ingress processes started", pids=[child.pid for child in children])
        exits = {asyncio.ensure_future(child.wait()): child for child in children}
        stop = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait([stop, *exits], return_when=asyncio.FIRST_COMPLETED)
        first = next((exits[task] for task in done if task in exits), None)
        if first is not None:
            log.error("ingress process exited", pid=first.pid, code=first.returncode)
        stop.cancel()
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()
        codes = [await child.wait() for child in children]  # each drains, then exits
    if first is not None:
        return first.returncode or 1
    return max(codes, key=abs)
