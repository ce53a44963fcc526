"""The audit trail's records: one row per money or auth event (`ops.audit`), kept when a
`database_url` is set.

Written in batches off the request path (`ops.audit.AuditTrail` flushes them), on a connection of
its own: one pooled PostgreSQL connection is plenty for batched inserts.
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from ..database_budget import DEFAULT_BUDGET, DatabaseBudget
from ..database_url import parse_database_url
from .choose import for_engine
from .engine import Engine, RecordStore, Schema
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

#: (time ISO 8601, kind, user, request id, outcome, amount, reference); see `ops.audit.AuditTrail.record`.
Row = tuple[str, str, str | None, str | None, str, int | None, str | None]

#: The kind is plain text, unchecked: a new kind of event needs no schema step.
SQLITE_SCHEMA = Schema(
    "audit",
    (
        (
            """CREATE TABLE IF NOT EXISTS audit_events (
                id         INTEGER PRIMARY KEY,
                at         TEXT NOT NULL,
                kind       TEXT NOT NULL,
                user_id    TEXT,
                request_id TEXT,
                outcome    TEXT NOT NULL,
                amount     INTEGER,
                reference  TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS audit_events_user ON audit_events (user_id, id)",
        ),
    ),
)

POSTGRES_SCHEMA = Schema(
    "audit",
    (
        (
            """CREATE TABLE audit_events (
                id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                at         TEXT NOT NULL,
                kind       TEXT NOT NULL,
                user_id    TEXT,
                request_id TEXT,
                outcome    TEXT NOT NULL,
                amount     BIGINT,
                reference  TEXT
            )""",
            "CREATE INDEX audit_events_user ON audit_events (user_id, id)",
        ),
    ),
)

_INSERT: Final = (
    "INSERT INTO audit_events (at, kind, user_id, request_id, outcome, amount, reference) VALUES "
)
_RECENT: Final = (
    "SELECT at, kind, user_id, request_id, outcome, amount, reference FROM audit_events "
    "ORDER BY id DESC LIMIT "
)


class AuditStore(RecordStore, abc.ABC):
    @abc.abstractmethod
    async def add(self, rows: Sequence[Row]) -> None:
        """Keep these events, all or none."""

    @abc.abstractmethod
    async def recent(self, limit: int) -> list[Row]:
        """The newest events, oldest first."""


def audit_store(database_url: str, budget: DatabaseBudget = DEFAULT_BUDGET) -> AuditStore:
    """The audit records on the database `database_url` names, on a connection of their own, each
    write within the budget's time."""
    url = parse_database_url(database_url)
    timeout = budget.timeout_seconds
    engine: Engine = (
        PostgresDatabase(url, max_size=1, timeout=timeout)
        if url.dialect == "postgresql"
        else SQLiteDatabase(url.target, timeout=timeout)
    )
    return for_engine(engine, "audit store", sqlite=SQLiteAuditStore, postgres=PostgresAuditStore)


def _row(found: Sequence[Any]) -> Row:
    at, kind, user, request_id, outcome, amount, reference = found
    return (at, kind, user, request_id, outcome, None if amount is None else int(amount), reference)


class SQLiteAuditStore(AuditStore):
    engine: SQLiteDatabase

    schema = SQLITE_SCHEMA

    async def add(self, rows: Sequence[Row]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(_INSERT + "(?, ?, ?, ?, ?, ?, ?)", rows)

        await self.engine.run(write)

    async def recent(self, limit: int) -> list[Row]:
        def read(conn: sqlite3.Connection) -> list[Row]:
            found = conn.execute(_RECENT + "?", (limit,)).fetchall()
            return [_row(row) for row in reversed(found)]

        return await self.engine.run(read)


class PostgresAuditStore(AuditStore):
    engine: PostgresDatabase

    schema = POSTGRES_SCHEMA

    async def add(self, rows: Sequence[Row]) -> None:
        # All or none without a transaction of its own: asyncpg's `executemany` is atomic (since
        # 0.22), so a batch is one round trip, not three (BEGIN, the rows, COMMIT).
        async with self.engine.connection() as conn:
            await conn.executemany(_INSERT + "($1, $2, $3, $4, $5, $6, $7)", rows)

    async def recent(self, limit: int) -> list[Row]:
        async with self.engine.connection() as conn:
            found = await conn.fetch(_RECENT + "$1", limit)
        return [_row(row) for row in reversed(found)]
