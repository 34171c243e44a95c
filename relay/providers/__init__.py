"""Webhook providers: each scheme turns a provider's signed request into relay's `Event`.

A scheme is one module offering the `Provider` functions (relay/providers/base.py) and one line
in `PROVIDERS`. Schemes do no I/O: they verify over the raw bytes, validate, and name the event,
its id and its ordering key.
"""

from relay.providers import envoice, github, hmac_sha256, standard_webhooks, stripe
from relay.providers.base import Event, Provider, Request

PROVIDERS: dict[str, Provider] = {
    "envoice": envoice,
    "standard-webhooks": standard_webhooks,
    "github": github,
    "stripe": stripe,
    "hmac-sha256": hmac_sha256,
}

__all__ = ["PROVIDERS", "Event", "Provider", "Request"]
