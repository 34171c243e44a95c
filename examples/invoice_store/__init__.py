"""An invoice store kept current from relay: an HTTP handler that verifies relay's Standard
Webhooks signature and applies each Envoice activity to its invoice's row, once and in order.

`make_app(store, secret)` builds the aiohttp application, `open_store(where)` a store (SQLite
file or `postgresql://` URL); `python -m examples.invoice_store` runs it (README.md here).
"""

from examples.invoice_store.app import make_app
from examples.invoice_store.store import (
    Applied,
    Invoice,
    Outcome,
    Store,
    StoreUnavailable,
    open_store,
)

__all__ = [
    "Applied",
    "Invoice",
    "Outcome",
    "Store",
    "StoreUnavailable",
    "make_app",
    "open_store",
]
