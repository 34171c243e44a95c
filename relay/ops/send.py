"""`relay send`: sign and POST sample webhooks to an ingress, for smoke tests, and rehearse a
provider's catch-up.

By default it sends `count` new webhooks spread over `invoices` invoices: each invoice's one after
the other, the invoices at once; every answer is counted and nothing is sent again.

Envoice documents that once a failing webhook URL works again "we will send you all activities,
both past and present, in chronological order". To rehearse that against a relay:

- `record`: each new webhook, once answered, is appended to a JSON-lines file (the history):
  `order` (its place in the history), `id` (the event id), `invoice`, `key` and `event` (as the
  ingress reads them), `occurred` (unix seconds) and `occurred_at` (the activity's time as the
  body says it) and `answer`. Webhooks sent again are not recorded again.
- `first_id`: the new webhooks' ids are first_id, first_id + 1, ... (default: time-based, so
  never a repeat).
- `catch_up`: first every webhook of a recorded history again, one at a time in the file's
  order (chronological, so each invoice's in order), each the same event (id, key, body) signed
  afresh (the schemes' timestamp and signature); then the new ones, after all of the past.
- `retry_for` (seconds; 0 = off): an answer 5xx or no answer (connection error, timeout) is
  retried with backoff (BACKOFF_FIRST doubling up to BACKOFF_MAX) until this long after its first
  failure, then counted as it was last answered; the invoice's later webhooks wait meanwhile,
  other invoices go on.
- `outage_catch_up` (needs `retry_for`): after a failure, the first webhook that gets through
  sets off Envoice's rule: once the POSTs under way are answered, every webhook sent so far in
  this run (past and present, each once, in the order first sent) is sent again, one at a time,
  and nothing else is sent until it is done. A failure during it is retried in place; a failure
  after it sets off the next.

An answer is what the last try of a send got: "accepted" or "duplicate" (the ingress's 200),
"HTTP <status>", or "failed" (no answer). A run is ok when every new webhook was accepted and
every one sent again was accepted or a duplicate.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, NamedTuple

import aiohttp
import orjson

from relay.errors import OptionError
from relay.providers import PROVIDERS, Provider
from relay.settings import SourceSettings

BACKOFF_FIRST = 0.1  # seconds before the first retry; doubling
BACKOFF_MAX = 2.0
GOT_THROUGH = ("accepted", "duplicate")


@dataclass(frozen=True, slots=True)
class Activity:
    """One activity of the history: all `Provider.sample` needs to make it again."""

    order: int  # its place in the history, from 1
    event_id: int
    invoice: int
    occurred: float | None  # unix seconds, the activity's time; None: when first sent


@dataclass(slots=True)
class SendReport:
    answers: Counter[str] = field(default_factory=Counter)  # "accepted", "duplicate", "HTTP 503"
    errors: list[str] = field(default_factory=list)
    retries: int = 0  # tries that failed and were retried (not in `answers`)
    catch_ups: int = 0  # outage catch-ups
    unexpected: int = 0  # new webhooks not accepted, sent-again ones neither accepted nor duplicate

    @property
    def ok(self) -> bool:
        return self.unexpected == 0

    def line(self) -> str:
        total = sum(self.answers.values())
        parts = ", ".join(f"{n} {what}" for what, n in sorted(self.answers.items()))
        extra = [f"{self.retries} retried"] if self.retries else []
        extra += [f"{self.catch_ups} outage catch-up(s)"] if self.catch_ups else []
        return f"sent {total}: {parts or 'nothing'}" + (f" ({', '.join(extra)})" if extra else "")


async def send(
    source: SourceSettings,
    url: str,
    *,
    count: int,
    invoices: int,
    first_id: int | None = None,
    record: Path | None = None,
    catch_up: Path | None = None,
    retry_for: float = 0.0,
    outage_catch_up: bool = False,
) -> SendReport:
    """POST the history in `catch_up` again, then `count` new signed webhooks spread over
    `invoices` invoices, in order per invoice; see the module's docstring. Raises OptionError
    for a history file that cannot be read or an option that cannot be."""
    if outage_catch_up and retry_for <= 0:
        raise OptionError("--outage-catch-up needs --retry-for")
    past = read_history(catch_up) if catch_up is not None else []
    start = max((webhook.order for webhook in past), default=0)
    first = time.time_ns() // 1000 if first_id is None else first_id  # time-based: unique
    per_invoice: dict[int, list[Activity]] = {}
    for i in range(count):
        invoice = 1 + i % invoices
        per_invoice.setdefault(invoice, []).append(
            Activity(start + 1 + i, first + i, invoice, None)
        )

    timeout = aiohttp.ClientTimeout(total=30)
    with _appending(record) as history:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            sender = Sender(source, url, session, retry_for, outage_catch_up, history)
            for webhook in past:  # one at a time: the provider's catch-up, in chronological order
                await sender.deliver(webhook, new=False)
            await asyncio.gather(*(sender.deliver_all(ids) for ids in per_invoice.values()))
    return sender.report


class Answer(NamedTuple):
    what: str  # "accepted", "duplicate", "HTTP 503", "failed"
    transient: bool  # 5xx or no answer: a provider tries again
    error: str | None


class Sender:
    """A provider's deliveries to one URL, with its retries and its outage catch-up."""

    def __init__(
        self,
        source: SourceSettings,
        url: str,
        session: aiohttp.ClientSession,
        retry_for: float,
        outage_catch_up: bool,
        history: IO[bytes] | None,
    ) -> None:
        self.report = SendReport()
        self._provider: Provider = PROVIDERS[source.scheme]
        self._source, self._url, self._session = source, url, session
        self._retry_for, self._outage_catch_up, self._history = retry_for, outage_catch_up, history
        self._sent: list[Activity] = []  # each once, in the order first sent: the catch-up's
        self._sent_ids: set[int] = set()
        self._failing = False  # a try failed since the last catch-up
        self._open = asyncio.Event()  # cleared while a catch-up runs: nothing else is sent
        self._open.set()
        self._posting = 0  # POSTs under way
        self._idle = asyncio.Event()  # set while none is
        self._idle.set()

    async def deliver_all(self, webhooks: list[Activity]) -> None:
        for webhook in webhooks:  # one after the other: the ingress accepts them in this order
            await self.deliver(webhook, new=True)

    async def deliver(self, webhook: Activity, *, new: bool) -> None:
        """Send one webhook until it is answered or given up; record it if `new`; then, if it got
        through after a failure, the outage catch-up."""
        await self._wait_open()
        if webhook.occurred is None:
            webhook = replace(webhook, occurred=time.time())
        if webhook.event_id not in self._sent_ids:
            self._sent_ids.add(webhook.event_id)
            self._sent.append(webhook)
        answer = await self._answer(webhook, wait_while_closed=True)
        self._count(answer, new=new)
        if new and self._history is not None:
            self._history.write(orjson.dumps(self._record(webhook, answer.what)) + b"\n")
            self._history.flush()
        got_through = answer.what in GOT_THROUGH
        # (with the gate closed a catch-up is under way already: this webhook is in it)
        if self._outage_catch_up and self._failing and got_through and self._open.is_set():
            await self._catch_up()

    async def _catch_up(self) -> None:
        """Envoice's rule once deliveries work again: all activities so far, in order, alone
        (once the POSTs under way are answered, none of the others is sent until it is done)."""
        self.report.catch_ups += 1
        self._open.clear()
        try:
            await self._idle.wait()  # nothing else starts while closed
            self._failing = False  # failures answered till now are what this catch-up mends
            for webhook in list(self._sent):
                self._count(await self._answer(webhook, wait_while_closed=False), new=False)
        finally:
            self._open.set()

    async def _answer(self, webhook: Activity, *, wait_while_closed: bool) -> Answer:
        """POST it; while the answer is transient, again with backoff for up to `retry_for`."""
        loop = asyncio.get_running_loop()
        give_up_at: float | None = None  # retry_for after the first failure
        delay = BACKOFF_FIRST
        while True:
            answer = await self._post(webhook)
            if not answer.transient or self._retry_for <= 0:
                return answer
            now = loop.time()
            give_up_at = now + self._retry_for if give_up_at is None else give_up_at
            if now >= give_up_at:
                return answer
            self._failing = True
            self.report.retries += 1
            await asyncio.sleep(min(delay, give_up_at - now))
            delay = min(delay * 2, BACKOFF_MAX)
            if wait_while_closed:
                await self._wait_open()

    async def _wait_open(self) -> None:
        while not self._open.is_set():  # a catch-up may start before a woken waiter runs
            await self._open.wait()

    async def _post(self, webhook: Activity) -> Answer:
        self._posting += 1
        self._idle.clear()
        try:
            return await self._post_once(webhook)
        finally:
            self._posting -= 1
            if not self._posting:
                self._idle.set()

    async def _post_once(self, webhook: Activity) -> Answer:
        request = self._provider.sample(
            self._source,
            event_id=webhook.event_id,
            key=webhook.invoice,
            now=time.time(),  # signed now: a catch-up's copy passes a timestamp tolerance
            occurred=webhook.occurred,
        )
        try:
            async with self._session.post(
                self._url, data=request.body, headers=dict(request.headers)
            ) as response:
                status = response.status
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Answer("failed", True, f"{type(exc).__name__}: {exc}")
        said = body if isinstance(body, dict) else {}
        if status == 200 and isinstance(said.get("status"), str):
            return Answer(said["status"], False, None)
        return Answer(f"HTTP {status}", status >= 500, f"{status} {said.get('error')}")

    def _count(self, answer: Answer, *, new: bool) -> None:
        self.report.answers[answer.what] += 1
        if answer.error is not None:
            self.report.errors.append(answer.error)
        if answer.what not in (("accepted",) if new else GOT_THROUGH):
            self.report.unexpected += 1

    def _record(self, webhook: Activity, answer: str) -> dict[str, Any]:
        """The history's line for a webhook: the event as the ingress reads it, and its answer."""
        assert webhook.occurred is not None
        at = webhook.occurred
        request = self._provider.sample(
            self._source, event_id=webhook.event_id, key=webhook.invoice, now=at, occurred=at
        )
        event = self._provider.parse(request, self._source, at)
        return {
            "order": webhook.order,
            "id": webhook.event_id,
            "invoice": webhook.invoice,
            "key": event.key,
            "event": event.name,
            "occurred": at,
            "occurred_at": event.occurred_at,
            "answer": answer,
        }


def read_history(path: Path) -> list[Activity]:
    """The webhooks a `record` file holds, in its order; OptionError naming the file, and the
    line, of what is wrong."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise OptionError(f"--catch-up {path}: {exc.strerror or exc}") from None
    history = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--catch-up {path} line {number}"
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise OptionError(f"{where}: not JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise OptionError(f"{where}: not a JSON object")
        for name in ("order", "id", "invoice", "occurred"):
            value = entry.get(name)
            kinds, what = (
                ((int, float), "a number") if name == "occurred" else ((int,), "an integer")
            )
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise OptionError(f"{where}: {name!r} missing or not {what}")
        history.append(Activity(entry["order"], entry["id"], entry["invoice"], entry["occurred"]))
    return history


@contextmanager
def _appending(path: Path | None) -> Iterator[IO[bytes] | None]:
    if path is None:
        yield None
        return
    try:
        file = path.open("ab")
    except OSError as exc:
        raise OptionError(f"--record {path}: {exc.strerror or exc}") from None
    with file:
        yield file
