"""End to end: `relay ingress` and `relay worker` as separate processes, real broker and handler."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from relay.metrics import MULTIPROCESS_ENV
from tests.handlers_for_tests import HttpHandler, Request
from tests.processes import STARTUP_SECONDS, Config, Relay, RelayProcess
from tests.support import activity, declare_topology, eventually, signed_body

pytestmark = pytest.mark.rabbit


# --- helpers ----------------------------------------------------------------------------------


def activities(invoices: int, each: int) -> dict[int, list[dict[str, Any]]]:
    """`each` Envoice activities for each of invoices 1..`invoices`, in sending order."""
    return {
        invoice: [activity(InvoiceId=invoice, InvoiceNumber=f"INV-{invoice}") for _ in range(each)]
        for invoice in range(1, invoices + 1)
    }


async def post_webhooks(config: Config, sent: dict[int, list[dict[str, Any]]]) -> list[str]:
    """POST each invoice's activities one after the other, invoices concurrently; the answers."""
    source = config.settings.sources[0]
    answers: list[str] = []

    async def post_invoice(client: aiohttp.ClientSession, acts: list[dict[str, Any]]) -> None:
        for act in acts:
            async with client.post(config.webhook_url, data=signed_body(source, act)) as response:
                answer = await response.json()
                answers.append(f"{response.status} {answer.get('status')} {answer.get('id')}")

    async with aiohttp.ClientSession() as client:
        await asyncio.gather(*(post_invoice(client, acts) for acts in sent.values()))
    return answers


def standard_webhooks_signature(secret: str, request: Request) -> str:
    """`v1,<base64 HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>">`, computed here
    from the Standard Webhooks spec rather than with relay's own code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    headers = request.headers
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request.body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# --- tests ------------------------------------------------------------------------------------


async def test_webhooks_reach_an_http_handler_signed_and_in_order_per_invoice(
    relay: Relay, http_handler: HttpHandler
) -> None:
    # Given relay's ingress and worker processes, and an HTTP handler with 4 partitions
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    config = relay.config(
        {"name": "billing", "events": ["envoice.#"], "url": http_handler.url,
         "signing_secret": secret, "partitions": 4}
    )  # fmt: skip
    ingress, worker = await relay.start(config)

    # When 200 signed webhooks over 10 invoices are POSTed, in order per invoice
    sent = activities(invoices=10, each=20)
    answers = await post_webhooks(config, sent)

    # Then the ingress accepts every one
    expected_ids = [f"envoice:{act['Id']}" for acts in sent.values() for act in acts]
    assert sorted(answers) == sorted(f"200 accepted {i}" for i in expected_ids)
    # and the handler gets every one, once, each invoice in the order sent
    await eventually(
        lambda: len(http_handler.requests) >= len(expected_ids), timeout=30, what="deliveries"
    )
    requests = list(http_handler.requests)
    assert sorted(r.id for r in requests) == sorted(expected_ids)
    for invoice, acts in sent.items():
        got = [r.id for r in requests if r.json["key"] == f"invoice:{invoice}"]
        assert got == [f"envoice:{act['Id']}" for act in acts], f"invoice {invoice}"
    # each a Standard Webhooks request with a valid signature, on its first attempt
    for request in requests:
        headers = request.headers
        assert headers["webhook-id"] == request.id
        assert headers["content-type"] == "application/json"
        assert headers["x-relay-attempt"] == "1"
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        signatures = headers["webhook-signature"].split()
        assert standard_webhooks_signature(secret, request) in signatures, request.id

    # When both processes get SIGTERM, Then they drain and exit 0
    assert await ingress.terminate() == 0
    assert await worker.terminate() == 0


async def test_relay_send_reaches_the_built_in_log_handler(relay: Relay) -> None:
    # Given relay's ingress and worker processes, with the built-in logging handler
    config = relay.config(
        {"name": "log", "events": ["envoice.#"], "call": "relay.handlers:log", "partitions": 4}
    )
    ingress, worker = await relay.start(config)

    # When `relay send` POSTs 20 sample webhooks over 4 invoices
    sender = await relay.run(
        "send", "--count", "20", "--invoices", "4", "--url", config.webhook_url, config=config
    )

    # Then it reports all accepted
    assert await sender.exit_code() == 0
    assert "sent 20: 20 accepted" in sender.output().splitlines()
    # and the worker delivers each to the log handler, which logs it
    await eventually(lambda: worker.logged("delivered") >= 20, timeout=20, what="20 delivered")
    assert await ingress.terminate() == 0
    assert await worker.terminate() == 0
    assert worker.logged("delivered") == 20
    assert worker.logged("activity") == 20


SW_SECRET = "whsec_" + base64.b64encode(b"standard webhooks key").decode()
SCHEME_SOURCES: list[dict[str, Any]] = [
    {"name": "envoice", "path": "/hooks/envoice", "scheme": "envoice", "secrets": ["e-secret"]},
    {"name": "sw", "path": "/hooks/sw", "scheme": "standard-webhooks", "secrets": [SW_SECRET],
     "key_path": "data.invoice_id"},
    {"name": "github", "path": "/hooks/github", "scheme": "github", "secrets": ["gh-secret"]},
    {"name": "stripe", "path": "/hooks/stripe", "scheme": "stripe", "secrets": ["whsec_stripe"]},
    {"name": "shop", "path": "/hooks/shop", "scheme": "hmac-sha256", "secrets": ["shop-secret"],
     "signature_header": "X-Signature", "timestamp_header": "X-Timestamp",
     "event_path": "header:X-Event", "key_path": "data.account"},
]  # fmt: skip
# What each source's samples for keys 1..3 are keyed by (the scheme's ordering key)
SAMPLE_KEYS = {
    "envoice": "invoice:{}", "sw": "invoice:{}", "github": "example/repo-{}",
    "stripe": "cus_{}", "shop": "invoice:{}",
}  # fmt: skip


def sent_order(message_id: str) -> int:
    """The number `relay send` gave a sample: it sends each key's samples in increasing order."""
    raw = message_id.split(":", 1)[1]
    return uuid.UUID(raw).int if "-" in raw else int(raw.rsplit("_", 1)[-1])


async def test_every_scheme_reaches_an_http_handler_routed_and_keyed(
    relay: Relay, http_handler: HttpHandler
) -> None:
    # Given one source of each scheme, and an HTTP handler bound to all of them
    patterns = [f"{source['name']}.#" for source in SCHEME_SOURCES]
    config = relay.config(
        {"name": "all", "events": patterns, "url": http_handler.url, "partitions": 2},
        sources=SCHEME_SOURCES,
    )
    ingress, worker = await relay.start(config)

    # When `relay send` signs and POSTs 12 samples over 3 keys to each source
    send = ("send", "--count", "12", "--invoices", "3", "--source")
    senders = [await relay.run(*send, s.name, config=config) for s in config.settings.sources]

    # Then every sample is accepted
    for sender in senders:
        assert await sender.exit_code() == 0, sender.output()
        assert "sent 12: 12 accepted" in sender.output().splitlines()
    # and delivered once, with its source's routing and ordering key, in order per key
    await eventually(lambda: len(http_handler.requests) >= 60, timeout=30, what="60 deliveries")
    requests = list(http_handler.requests)
    assert len({r.id for r in requests}) == len(requests) == 60
    for source in SCHEME_SOURCES:
        name = source["name"]
        got = [r for r in requests if r.json["source"] == name]
        assert len(got) == 12, name  # else `all` below holds for none
        assert all(r.id.startswith(f"{name}:") for r in got)
        keys = {SAMPLE_KEYS[name].format(i) for i in (1, 2, 3)}
        assert {r.json["key"] for r in got} == keys, name
        for key in keys:
            order = [sent_order(r.id) for r in got if r.json["key"] == key]
            assert len(order) == 4, (name, key)
            assert order == sorted(order), (name, key)
        if name != "envoice":
            event = "issues.opened" if name == "github" else "invoice.paid"
            assert {r.json["event"] for r in got} == {event}, name
    assert await ingress.terminate() == 0
    assert await worker.terminate() == 0


def publishers_connected(ingress: RelayProcess) -> int:
    return sum(e.get("component") == "publisher" for e in ingress.events("broker connected"))


async def test_ingress_processes_share_a_port_and_their_metrics(relay: Relay) -> None:
    # Given `relay ingress --processes 2` (and a handler queue to route to)
    config = relay.config({"name": "log", "events": ["envoice.#"], "call": "relay.handlers:log"})
    await declare_topology(config.settings)
    ingress = await relay.run("ingress", "--processes", "2", config=config)
    # (ready: each child connected and read the ids accepted before, else it answers 503)
    await eventually(
        lambda: publishers_connected(ingress) == 2 and ingress.logged("accepted ids known") == 2,
        timeout=STARTUP_SECONDS,
        what="ready",
    )
    pids = await eventually(lambda: child_pids(ingress.process.pid, 2), what="two children")

    # When 40 webhooks arrive, each on a new connection (the kernel spreads them)
    source = config.settings.sources[0]
    acts = [activity(InvoiceId=7) for _ in range(40)]
    answers = []
    for act in acts:
        async with (
            aiohttp.ClientSession() as client,
            client.post(config.webhook_url, data=signed_body(source, act)) as response,
        ):
            body = await response.json()
            answers.append((response.status, body.get("status", body)))

    # Then every one is accepted, and /metrics counts all 40 whichever child answers
    assert answers == [(200, "accepted")] * 40
    for _ in range(6):  # new connections: both children answer some (per-child counts: ~20)
        async with (
            aiohttp.ClientSession() as client,
            client.get(config.base_url + "/metrics") as response,
        ):
            text = await response.text()
        counted = re.search(r'requests_total\{source="envoice",status="200"\} (\S+)', text)
        assert counted is not None, text[:2000]
        assert float(counted.group(1)) == 40
    # and each child answered some of them itself (its own metrics file says how many)
    answered = [accepted_by(pid) for pid in pids]
    print(f"webhooks accepted by each child: {answered}")
    assert sum(answered) == 40
    assert min(answered) > 0, answered  # 40 connections to one child: 1 in 2**39 by chance

    # When the parent gets SIGTERM, Then it and both children exit 0
    assert await ingress.terminate() == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)  # noqa: ASYNC240


def accepted_by(pid: int) -> float:
    """The webhooks ingress child `pid` answered 200, from its own file among the children's
    metrics (prometheus_client's multiprocess mode keeps one per process, in the directory the
    parent gives them all in its environment)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    prefix = f"{MULTIPROCESS_ENV}=".encode()
    directory = next(item[len(prefix) :].decode() for item in environ if item.startswith(prefix))
    own = Path(directory) / f"counter_{pid}.db"
    assert own.exists(), f"no metrics file of child {pid} in {directory}"
    metrics = MultiProcessCollector.merge([str(own)])  # type: ignore[no-untyped-call]
    return sum(
        float(sample.value)
        for metric in metrics
        for sample in metric.samples
        if sample.name == "relay_ingress_requests_total" and sample.labels.get("status") == "200"
    )


@pytest.mark.timeout(STARTUP_SECONDS + 40)
async def test_ingress_processes_stop_when_their_parent_is_killed(relay: Relay) -> None:
    # Given `relay ingress --processes 2`, both children serving
    config = relay.config({"name": "log", "events": ["envoice.#"], "call": "relay.handlers:log"})
    ingress = await relay.run("ingress", "--processes", "2", config=config)
    pids = await eventually(
        lambda: child_pids(ingress.process.pid, 2), timeout=STARTUP_SECONDS, what="two children"
    )

    # When the parent is killed outright (no chance to stop them)
    await ingress.kill()

    # Then both children stop by themselves (the kernel's SIGTERM: they drain and exit)
    await eventually(
        lambda: not any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids),
        timeout=30,
        what="the children gone",
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def child_pids(pid: int, count: int) -> list[int] | None:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children] if len(children) == count else None
