"""`python -m examples.invoice_store --port 8090 --db invoices.sqlite3 --secret env:NAME`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from examples.invoice_store.app import make_app
from examples.invoice_store.signature import signing_key
from examples.invoice_store.store import StoreUnavailable, open_store

EXIT_CONFIG = 2  # a bad argument or secret
EXIT_STORE = 3  # the database could not be opened


def read_secret(spec: str) -> str:
    """`env:NAME` or `file:/path`: the handler's signing_secret, never on the command line."""
    if spec.startswith("env:"):
        value = os.environ.get(spec[4:], "")
    elif spec.startswith("file:"):
        value = Path(spec[5:]).read_text(encoding="utf-8")
    else:
        raise ValueError("--secret: expected env:NAME or file:/path")
    if not value.strip():
        raise ValueError(f"--secret: {spec} is empty or not set")
    return value.strip()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.invoice_store",
        description="An invoice store kept current from relay's deliveries of Envoice activities.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--db", default="invoices.sqlite3",
                   help="a SQLite file, or a postgresql:// URL (needs psycopg)")  # fmt: skip
    p.add_argument("--secret", required=True,
                   help="the handler's signing_secret: env:NAME or file:/path")  # fmt: skip
    return p


async def build(db: str, secret: str) -> web.Application:
    store = await open_store(db)

    async def close_store(_: web.Application) -> None:
        await store.close()

    app = make_app(store, secret)
    app.on_cleanup.append(close_store)
    return app


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        secret = read_secret(args.secret)
        signing_key(secret)  # refused before the database is touched
    except (OSError, ValueError) as exc:
        print(f"invoice_store: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        web.run_app(build(args.db, secret), host=args.host, port=args.port)
    except StoreUnavailable as exc:
        print(f"invoice_store: cannot open the database: {exc}", file=sys.stderr)
        sys.exit(EXIT_STORE)
