"""What the benchmarks share: child processes with logs, readiness polls, memory readings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
AMQP_URL = os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
STARTUP_SECONDS = 30.0  # for a subprocess to answer
STOP_SECONDS = 20.0  # after SIGTERM, before SIGKILL


# A config of one Envoice source on loopback: format with exchange, port, path and secret.
SOURCE_CONFIG = """[broker]
exchange = "{exchange}"
[ingress]
host = "127.0.0.1"
port = {port}
[[sources]]
name = "envoice"
path = "{path}"
scheme = "envoice"
secrets = ["{secret}"]
"""


class BenchError(Exception):
    """The benchmark cannot go on: a process did not start, or died."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Child:
    """A subprocess of the bench, its output in a log file."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.process, self.log = name, process, log

    @classmethod
    async def start(cls, name: str, log: Path, *argv: str, amqp_url: str = AMQP_URL) -> Child:
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, *argv, cwd=ROOT, env={**os.environ, "RELAY_AMQP_URL": amqp_url},
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        return cls(name, process, log)

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise BenchError(f"{self.name} exited {self.process.returncode}:\n{self.log_tail()}")

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_SECONDS; the exit code."""
        for send in (self.process.terminate, self.process.kill):
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    send()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), STOP_SECONDS)
        return self.process.returncode or 0

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


async def wait_ok(session: aiohttp.ClientSession, url: str, child: Child) -> None:
    """Until GET `url` answers 200 (or STARTUP_SECONDS pass, or `child` dies)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        child.check_alive()
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name}: {url} not 200 within {STARTUP_SECONDS:g} s")
        await asyncio.sleep(0.1)


def memory_kb(pid: int, field: str) -> int:
    """VmRSS or VmHWM of `pid` in kB; 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
