"""The invoice store: one row per invoice, kept current by applying each activity once.

Each delivery is one transaction that (a) records its webhook id in `applied` (the primary key):
if the id is already there the delivery is a repeat, counted on that row and otherwise ignored;
(b) upserts the invoice's row from the activity; (c) notes the activity's place in its invoice's
history. SQLite (a file) by default, PostgreSQL for a `postgresql://` URL (needs `psycopg`: the
optional extra `examples`). Both speak the same SQL over one connection in a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from examples.invoice_store.envelope import Activity, status_after

R = TypeVar("R")


class StoreUnavailable(Exception):
    """The database cannot be reached or written now (locked, down, disk full): try later."""


class Outcome(StrEnum):
    APPLIED = "applied"  # the activity changed its invoice's row
    REPEAT = "repeat"  # its webhook id was applied before: nothing changed
    NO_INVOICE = "no-invoice"  # about no invoice (an order's): its id recorded, no row changed


@dataclass(frozen=True, slots=True)
class Invoice:
    """An invoice's row: its state after the last activity applied."""

    invoice_id: int
    invoice_number: str | None
    status: str | None  # draft, sent, paid, unpaid, overdue, rejected, void; None: not yet known
    link: str | None
    last_event: str  # the last activity's event name: "paid", "sent_via_email"
    last_type: int | None  # and its Type code
    last_activity_id: int
    last_activity_at: str  # its CreatedOn, as Envoice wrote it
    last_message: str | None
    activities: int  # activities applied to it
    updated_at: str  # when relay accepted the last one


@dataclass(frozen=True, slots=True)
class Applied:
    """A webhook id the store has applied."""

    webhook_id: str
    invoice_id: int | None
    activity_id: int
    position: int | None  # its place in its invoice's history: 1, 2, ...; None: no invoice
    repeats: int  # later deliveries of it, ignored


class Store(Protocol):
    async def open(self) -> None:
        """Connect and create the tables if they are missing; raises StoreUnavailable."""
        ...

    async def apply(self, activity: Activity) -> Outcome:
        """Apply one delivered activity, once; raises StoreUnavailable (nothing applied)."""
        ...

    async def rows(self) -> list[Invoice]:
        """Every invoice's row, by invoice id."""
        ...

    async def applied(self) -> list[Applied]:
        """Every webhook id applied, by invoice and position (ids of no invoice last)."""
        ...

    async def applied_counts(self) -> dict[str, int]:
        """Each webhook id and how many deliveries of it arrived: one applied, the rest repeats
        (so 1 everywhere: each delivered once)."""
        ...

    async def close(self) -> None: ...


async def open_store(where: str) -> Store:
    """The store at `where`: a `postgresql://` URL, else a SQLite file path; opened."""
    store: Store
    if where.startswith(("postgresql://", "postgres://")):
        store = PostgresStore(where)
    else:
        store = SqliteStore(where)
    await store.open()
    return store


# --- SQL both databases speak (%s: a parameter) ------------------------------------------------


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS invoices (
        invoice_id BIGINT PRIMARY KEY,
        invoice_number TEXT,
        status TEXT,
        link TEXT,
        last_event TEXT NOT NULL,
        last_type BIGINT,
        last_activity_id BIGINT NOT NULL,
        last_activity_at TEXT NOT NULL,
        last_message TEXT,
        activities BIGINT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS applied (
        webhook_id TEXT PRIMARY KEY,
        invoice_id BIGINT,
        activity_id BIGINT NOT NULL,
        position BIGINT,
        repeats BIGINT NOT NULL DEFAULT 0
    )""",
)
RECORD = """INSERT INTO applied (webhook_id, invoice_id, activity_id) VALUES (%s, %s, %s)
    ON CONFLICT (webhook_id) DO NOTHING"""
COUNT_REPEAT = "UPDATE applied SET repeats = repeats + 1 WHERE webhook_id = %s"
UPSERT = """INSERT INTO invoices (invoice_id, invoice_number, status, link, last_event, last_type,
        last_activity_id, last_activity_at, last_message, activities, updated_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 1, %s)
    ON CONFLICT (invoice_id) DO UPDATE SET
        invoice_number = COALESCE(excluded.invoice_number, invoices.invoice_number),
        status = COALESCE(excluded.status, invoices.status),
        link = COALESCE(excluded.link, invoices.link),
        last_event = excluded.last_event,
        last_type = excluded.last_type,
        last_activity_id = excluded.last_activity_id,
        last_activity_at = excluded.last_activity_at,
        last_message = excluded.last_message,
        activities = invoices.activities + 1,
        updated_at = excluded.updated_at
    RETURNING activities"""
PLACE = "UPDATE applied SET position = %s WHERE webhook_id = %s"
ROWS = """SELECT invoice_id, invoice_number, status, link, last_event, last_type,
        last_activity_id, last_activity_at, last_message, activities, updated_at
    FROM invoices ORDER BY invoice_id"""  # Invoice's fields, in order
APPLIED = """SELECT webhook_id, invoice_id, activity_id, position, repeats
    FROM applied ORDER BY invoice_id IS NULL, invoice_id, position, webhook_id"""


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchall(self) -> list[Any]: ...


class _Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = (), /) -> _Cursor: ...

    def close(self) -> None: ...


class _SqlStore:
    """A store over one DB-API connection, used only from its own thread."""

    PARAMETER = "%s"  # how the database spells a parameter
    BEGIN = "BEGIN"
    unavailable: tuple[type[Exception], ...] = ()  # what the database raises when it is

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="invoice-store")
        self._connection: _Connection | None = None

    def _connect(self) -> _Connection:
        raise NotImplementedError

    async def open(self) -> None:
        await self._run(self._create)

    async def apply(self, activity: Activity) -> Outcome:
        return await self._run(self._apply, activity)

    async def rows(self) -> list[Invoice]:
        return [Invoice(*row) for row in await self._run(self._select, ROWS)]

    async def applied(self) -> list[Applied]:
        return [Applied(*row) for row in await self._run(self._select, APPLIED)]

    async def applied_counts(self) -> dict[str, int]:
        return {a.webhook_id: 1 + a.repeats for a in await self.applied()}

    async def close(self) -> None:
        await self._run(self._disconnect)
        self._thread.shutdown()

    async def _run(self, work: Callable[..., R], *args: Any) -> R:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)
        except self.unavailable as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}".strip()) from exc

    # --- in the store's thread ---

    def _execute(self, sql: str, *params: Any) -> _Cursor:
        if self._connection is None:
            self._connection = self._connect()
        try:
            return self._connection.execute(sql.replace("%s", self.PARAMETER), params)
        except self.unavailable:
            self._drop_if_broken()
            raise

    def _drop_if_broken(self) -> None:
        """Forget a connection that no longer works (the next call opens a new one)."""

    def _create(self) -> None:
        for statement in SCHEMA:
            self._execute(statement)

    def _select(self, sql: str) -> list[Any]:
        return self._execute(sql).fetchall()

    def _apply(self, activity: Activity) -> Outcome:
        self._execute(self.BEGIN)
        try:
            outcome = self._apply_in_transaction(activity)
            self._execute("COMMIT")
        except BaseException:
            if self._connection is not None:
                with contextlib.suppress(*self.unavailable):  # gone, and the transaction with it
                    self._execute("ROLLBACK")
            raise
        return outcome

    def _apply_in_transaction(self, a: Activity) -> Outcome:
        if self._execute(RECORD, a.webhook_id, a.invoice_id, a.id).rowcount == 0:
            self._execute(COUNT_REPEAT, a.webhook_id)
            return Outcome.REPEAT
        if a.invoice_id is None:
            return Outcome.NO_INVOICE
        [(position,)] = self._execute(
            UPSERT, a.invoice_id, a.invoice_number, status_after(a.event), a.link, a.event,
            a.type, a.id, a.created_on, a.message, a.received_at,
        ).fetchall()  # fmt: skip
        self._execute(PLACE, position, a.webhook_id)
        return Outcome.APPLIED

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class SqliteStore(_SqlStore):
    """A SQLite file in WAL mode; a locked or unwritable database is unavailable."""

    PARAMETER = "?"
    BEGIN = "BEGIN IMMEDIATE"  # take the write lock first: no upgrade to fail half-way
    unavailable = (sqlite3.OperationalError,)

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        super().__init__()
        self.path = path
        self._busy_timeout = busy_timeout  # seconds to wait for another writer's lock

    def _connect(self) -> _Connection:
        # isolation_level None: no transaction of the driver's, we say BEGIN
        connection = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            # FULL: a delivery answered 200 is on disk, even after a power cut (relay will not
            # send it again)
            connection.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error:
            connection.close()
            raise
        return connection


class PostgresStore(_SqlStore):
    """A PostgreSQL database; a lost connection is unavailable, and opened again next time."""

    def __init__(self, url: str, *, connect_timeout: int = 5) -> None:
        super().__init__()
        import psycopg  # the optional extra `examples`: only this store needs it

        self.unavailable = (psycopg.OperationalError,)
        self._url = url
        self._connect_timeout = connect_timeout

    def _connect(self) -> _Connection:
        import psycopg

        # autocommit: no transaction of the driver's, we say BEGIN
        connection: _Connection = psycopg.connect(
            self._url, autocommit=True, connect_timeout=self._connect_timeout
        )
        return connection

    def _drop_if_broken(self) -> None:
        if self._connection is not None and getattr(self._connection, "broken", False):
            self._disconnect()
