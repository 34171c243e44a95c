"""The HTTP handler relay POSTs to: verify, read the envelope, apply, answer.

Answers: 200 applied (or a repeat, or about no invoice: nothing to do), 401 a bad or missing
signature, 400 a body that is not relay's envelope of an Envoice activity (both permanent for
relay: the message is dead-lettered), 503 the database is unavailable (relay retries, in order).
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from examples.invoice_store import envelope
from examples.invoice_store.signature import BadSignature, signing_key, verify
from examples.invoice_store.store import Store, StoreUnavailable

PATH = "/hooks"
RETRY_AFTER_SECONDS = 2  # relay honours Retry-After on a 503
REPLAYED_HEADER = "x-relay-replayed"  # on a message relay sends again (dlq replay, relay replay)

SIGNING_KEY = web.AppKey("signing_key", bytes)
STORE: web.AppKey[Store] = web.AppKey("store")

log = logging.getLogger(__name__)


def make_app(store: Store, secret: str) -> web.Application:
    """The application, with `store` (opened, and closed by the caller) and the handler's
    `signing_secret` (`whsec_<base64>` or base64; ValueError if it is neither)."""
    app = web.Application()
    app[SIGNING_KEY] = signing_key(secret)
    app[STORE] = store
    app.router.add_post(PATH, receive)
    return app


async def receive(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        webhook_id = verify(request.app[SIGNING_KEY], request.headers, body, time.time())
    except BadSignature as exc:
        return web.json_response({"error": str(exc)}, status=401)
    try:
        activity = envelope.read(body, webhook_id)
    except envelope.NotAnEnvelope as exc:
        return web.json_response({"error": str(exc)}, status=400)
    try:
        outcome = await request.app[STORE].apply(activity)
    except StoreUnavailable as exc:
        log.warning("database unavailable: %s (%s answered 503)", exc, webhook_id)
        return web.json_response(
            {"error": "database unavailable"},
            status=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    # A replay of an id already applied is a repeat too: the row already holds what it says.
    replayed = request.headers.get(REPLAYED_HEADER, "")
    log.info("%s %s invoice=%s%s", outcome, webhook_id, activity.invoice_id,
             f" replayed={replayed}" if replayed else "")  # fmt: skip
    return web.json_response({"outcome": outcome.value, "invoice": activity.invoice_id})
