"""The Stripe events the `stripe` provider has handled, by event id: Stripe delivers each at least once,
so a repeat is known here and changes nothing (its effect was had, or is had exactly once anyway:
credits by payment, clawbacks by how much a payment has had taken back).

An event is recorded only once it has been handled; a failure in between leaves it unrecorded, the
webhook answers 503 and Stripe sends it again. Shares the engine of the payment store beside it.
"""

from __future__ import annotations

import abc
import sqlite3
from datetime import UTC, datetime

from .choose import for_engine
from .engine import Engine, Migrated, Schema
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

_TABLE = """CREATE TABLE {exists}stripe_events (
    event_id    TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    payment_id  TEXT,
    received_at TEXT NOT NULL
)"""

SQLITE_SCHEMA = Schema("stripe_events", ((_TABLE.format(exists="IF NOT EXISTS "),),))
POSTGRES_SCHEMA = Schema("stripe_events", ((_TABLE.format(exists=""),),))


class StripeEventStore(abc.ABC):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @abc.abstractmethod
    async def open(self) -> Migrated:
        """Bring the schema up to date (the engine is already open)."""

    @abc.abstractmethod
    async def seen(self, event_id: str) -> bool: ...

    @abc.abstractmethod
    async def record(self, event_id: str, kind: str, payment_id: str | None) -> bool:
        """Keep a handled event; False when it was kept already (by another delivery of it)."""


def stripe_event_store(engine: Engine) -> StripeEventStore:
    return for_engine(
        engine, "Stripe event store", sqlite=SQLiteStripeEventStore, postgres=PostgresStripeEventStore
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SQLiteStripeEventStore(StripeEventStore):
    engine: SQLiteDatabase

    async def open(self) -> Migrated:
        return await self.engine.migrate(SQLITE_SCHEMA)

    async def seen(self, event_id: str) -> bool:
        def read(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM stripe_events WHERE event_id = ?", (event_id,)).fetchone()
            return row is not None

        return await self.engine.run(read)

    async def record(self, event_id: str, kind: str, payment_id: str | None) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO stripe_events (event_id, type, payment_id, received_at)"
                    " VALUES (?, ?, ?, ?)",
                    (event_id, kind, payment_id, _now()),
                )
                return cursor.rowcount == 1

        return await self.engine.run(write)


class PostgresStripeEventStore(StripeEventStore):
    engine: PostgresDatabase

    async def open(self) -> Migrated:
        return await self.engine.migrate(POSTGRES_SCHEMA)

    async def seen(self, event_id: str) -> bool:
        async with self.engine.connection() as conn:
            return bool(await conn.fetchval("SELECT 1 FROM stripe_events WHERE event_id = $1", event_id))

    async def record(self, event_id: str, kind: str, payment_id: str | None) -> bool:
        async with self.engine.connection() as conn:
            done = await conn.execute(
                "INSERT INTO stripe_events (event_id, type, payment_id, received_at) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (event_id) DO NOTHING",
                event_id,
                kind,
                payment_id,
                _now(),
            )
        return bool(done == "INSERT 0 1")
