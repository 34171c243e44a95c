"""`relay send`: sign and POST sample webhooks to an ingress, for smoke tests."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from relay.providers import PROVIDERS
from relay.settings import SourceSettings


@dataclass(slots=True)
class SendReport:
    answers: Counter[str] = field(default_factory=Counter)  # "accepted", "duplicate", "HTTP 503"
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        total = sum(self.answers.values())
        parts = ", ".join(f"{n} {what}" for what, n in sorted(self.answers.items()))
        return f"sent {total}: {parts or 'nothing'}"


async def send(source: SourceSettings, url: str, *, count: int, invoices: int) -> SendReport:
    """POST `count` signed webhooks spread over `invoices` invoices, in order per invoice."""
    provider = PROVIDERS[source.scheme]
    report = SendReport()
    first_id = time.time_ns() // 1000  # unique across runs, so nothing is a duplicate
    per_invoice: dict[int, list[int]] = {}
    for i in range(count):
        per_invoice.setdefault(1 + i % invoices, []).append(first_id + i)

    async def send_invoice(session: aiohttp.ClientSession, invoice: int, ids: list[int]) -> None:
        for event_id in ids:  # one after the other: the ingress accepts them in this order
            sample = provider.sample(source, event_id=event_id, key=invoice, now=time.time())
            try:
                async with session.post(
                    url, data=sample.body, headers=dict(sample.headers)
                ) as response:
                    answer = await response.json(content_type=None)
                    what = answer.get("status") if response.status == 200 else None
                    report.answers[what or f"HTTP {response.status}"] += 1
                    if response.status != 200:
                        report.errors.append(f"{response.status} {answer.get('error')}")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                report.answers["failed"] += 1
                report.errors.append(f"{type(exc).__name__}: {exc}")

    client_timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        await asyncio.gather(*(send_invoice(session, k, ids) for k, ids in per_invoice.items()))
    return report
