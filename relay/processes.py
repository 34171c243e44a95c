"""`relay ingress --processes N`: N ingress processes on one port, so that one machine's ingress
uses all its cores.

The parent starts N `relay ingress --reuse-port` children: the kernel spreads new connections
over them (SO_REUSEPORT), each has its own broker connection and memory of accepted ids, and their
metrics are summed through prometheus_client's multiprocess mode, so /metrics is whole whichever
child answers. A stop signal reaches every child, which drains and exits; if a child exits on
its own, the parent stops the others and exits with that child's code, for the service manager
to restart the whole (the same contract as one process). A parent killed outright (kill -9)
cannot stop them: the kernel sends each child SIGTERM then (PR_SET_PDEATHSIG, on Linux), so none
is left serving the port alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
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
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relay",
                *argv,
                env=env,
                preexec_fn=functools.partial(_stop_with_parent, os.getpid()),
            )
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _stop_with_parent(parent: int) -> None:
    """In a child, before it runs: SIGTERM it when its parent dies (Linux; elsewhere nothing),
    and end it at once if the parent died already."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
