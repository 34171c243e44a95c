"""`relay replay`: send a handler the archived messages accepted since a time again, each key in
acceptance order and never ahead of an older message of its key still waiting (relay/replays.py
says how). It marks the partitions, fills the replay queue with a progress line, and exits once
the queue is full; the workers deliver it. `--dry-run` counts what it would send, per event,
and touches nothing.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from relay import replays
from relay.broker import connect, give_turn, wait_for_turn
from relay.errors import OptionError, RelayError
from relay.replays import Replay
from relay.settings import HandlerSettings, Settings, duration_seconds

TURN_SECONDS = 3600.0  # replays of one handler are filled one at a time
PROGRESS_SECONDS = 1.0


def parse_time(text: str, now: datetime) -> datetime:
    """RFC 3339 (`2026-12-07T14:00:00Z`) or a duration back from `now` (`90m`, `2h`, `7d`)."""
    seconds = duration_seconds(text)
    if seconds is not None:
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise OptionError(
            f"{text!r} is neither an RFC 3339 time (2026-12-07T14:00:00Z) nor a duration "
            "(90m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        raise OptionError(f"{text!r} has no time zone: add Z or an offset such as +01:00")
    return when


@dataclass(frozen=True, slots=True)
class Replayed:
    replay: str  # "" for a dry run
    queued: Counter[str]  # per routing key


async def replay(
    settings: Settings, handler: HandlerSettings, wanted: Replay, *, dry_run: bool
) -> Replayed:
    """Queue `wanted` for its handler (or only count it, with `dry_run`); progress on stderr."""
    connection = await connect(settings.broker)
    async with connection:
        exchange = settings.broker.exchange
        reach = await replays.archive_reach(connection)
        if reach is not None and wanted.since < reach:
            raise RelayError(
                f"the archive reaches back to {reach.isoformat()} only (its retention dropped "
                "what is older): replay --since that or later"
            )
        if dry_run:
            counted: Counter[str] = Counter()
            async for message in replays.read_archive(connection, exchange, wanted.since):
                if wanted.wants(handler, message):
                    counted[message.routing_key or ""] += 1
            return Replayed("", counted)
        what = "another replay of this handler"
        await wait_for_turn(connection, wanted.turn, give_up_after=TURN_SECONDS, what=what)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            async with channel:
                await replays.begin(channel, handler, wanted)
            progress = _Progress(wanted.id)
            queued = await replays.fill(
                connection, exchange, handler, wanted, attempt=1, marked_at=datetime.now(UTC),
                progress=progress.show,
            )  # fmt: skip
            progress.done()
        finally:
            await give_turn(connection, wanted.turn)
    return Replayed(wanted.id, queued)


class _Progress:
    def __init__(self, replay: str) -> None:
        self._replay, self._shown, self._count = replay, 0.0, 0

    def show(self, count: int) -> None:
        self._count = count
        if time.monotonic() - self._shown >= PROGRESS_SECONDS:
            self._shown = time.monotonic()
            print(f"replay {self._replay}: {count} queued", file=sys.stderr)

    def done(self) -> None:
        print(f"replay {self._replay}: {self._count} queued, done", file=sys.stderr)
