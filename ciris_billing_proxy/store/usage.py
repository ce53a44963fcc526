"""The usage ledger of the `simple` provider: how many free uses each user has spent, and each event.

One interface, one implementation per engine (`usage_ledger(engine)` picks it). Both keep the same
promises, whatever number of processes share the database: a spend never takes more than the limit,
a key spent twice takes one use, and a use is given back at most once, only if it was taken.
"""

from __future__ import annotations

import abc
import sqlite3
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .choose import for_engine
from .engine import Engine, RecordStore, Schema
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

if TYPE_CHECKING:
    import asyncpg

#: (id, kind, used_after, created_at)
Event = tuple[int, str, int, str]

SQLITE_SCHEMA = Schema(
    "usage",
    (
        (
            """CREATE TABLE IF NOT EXISTS usage (
                namespace TEXT NOT NULL,
                user_id   TEXT NOT NULL,
                used      INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
                PRIMARY KEY (namespace, user_id)
            ) WITHOUT ROWID""",
            """CREATE TABLE IF NOT EXISTS usage_events (
                id              INTEGER PRIMARY KEY,
                namespace       TEXT NOT NULL,
                user_id         TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                kind            TEXT NOT NULL CHECK (kind IN ('use', 'give_back')),
                used_after      INTEGER NOT NULL,
                created_at      TEXT NOT NULL,
                UNIQUE (namespace, user_id, idempotency_key, kind)
            )""",
        ),
    ),
)

POSTGRES_SCHEMA = Schema(
    "usage",
    (
        (
            """CREATE TABLE usage (
                namespace TEXT NOT NULL,
                user_id   TEXT NOT NULL,
                used      INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
                PRIMARY KEY (namespace, user_id)
            )""",
            """CREATE TABLE usage_events (
                id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                namespace       TEXT NOT NULL,
                user_id         TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                kind            TEXT NOT NULL CHECK (kind IN ('use', 'give_back')),
                used_after      INTEGER NOT NULL,
                created_at      TEXT NOT NULL,
                UNIQUE (namespace, user_id, idempotency_key, kind)
            )""",
        ),
    ),
)


class UsageLedger(RecordStore, abc.ABC):
    """Opened and closed with the provider that owns it; `open` brings the schema up to date."""

    @abc.abstractmethod
    async def used(self, namespace: str, user_id: str) -> int: ...

    @abc.abstractmethod
    async def events(self, namespace: str, user_id: str, limit: int, offset: int) -> tuple[list[Event], int]:
        """Newest first, and how many there are in all."""

    async def spend(self, namespace: str, user_id: str, key: str, limit: int) -> bool:
        """Take one use if fewer than `limit` are used. False when none is left.

        A key already spent counts as spent again without taking another use.
        """
        return await self.spend_counted(namespace, user_id, key, limit) is not None

    @abc.abstractmethod
    async def spend_counted(self, namespace: str, user_id: str, key: str, limit: int) -> int | None:
        """`spend`, answering the uses counted right after it (None when none is left): what the
        user's status is then, without another round trip."""

    @abc.abstractmethod
    async def give_back(self, namespace: str, user_id: str, key: str) -> None:
        """Return the use spent under `key`; once only, and never for a key that was not spent."""


def usage_ledger(engine: Engine) -> UsageLedger:
    return for_engine(engine, "usage ledger", sqlite=SQLiteUsageLedger, postgres=PostgresUsageLedger)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SQLiteUsageLedger(UsageLedger):
    engine: SQLiteDatabase

    schema = SQLITE_SCHEMA

    async def used(self, namespace: str, user_id: str) -> int:
        return await self.engine.run(lambda conn: _used(conn, namespace, user_id))

    async def events(self, namespace: str, user_id: str, limit: int, offset: int) -> tuple[list[Event], int]:
        def read(conn: sqlite3.Connection) -> tuple[list[Event], int]:
            rows = conn.execute(
                "SELECT id, kind, used_after, created_at FROM usage_events "
                "WHERE namespace = ? AND user_id = ? ORDER BY id DESC LIMIT ? OFFSET ?",
                (namespace, user_id, limit, offset),
            ).fetchall()
            (total,) = conn.execute(
                "SELECT COUNT(*) FROM usage_events WHERE namespace = ? AND user_id = ?", (namespace, user_id)
            ).fetchone()
            return [(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows], int(total)

        return await self.engine.run(read)

    async def spend_counted(self, namespace: str, user_id: str, key: str, limit: int) -> int | None:
        def write(conn: sqlite3.Connection) -> int | None:
            with transaction(conn):
                if _has_event(conn, namespace, user_id, key, "use"):
                    return _used(conn, namespace, user_id)
                conn.execute(
                    "INSERT OR IGNORE INTO usage (namespace, user_id, used) VALUES (?, ?, 0)",
                    (namespace, user_id),
                )
                row = conn.execute(
                    "UPDATE usage SET used = used + 1 "
                    "WHERE namespace = ? AND user_id = ? AND used < ? RETURNING used",
                    (namespace, user_id, limit),
                ).fetchone()
                if row is None:
                    return None
                used = int(row[0])
                _record(conn, namespace, user_id, key, "use", used)
                return used

        return await self.engine.run(write)

    async def give_back(self, namespace: str, user_id: str, key: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                if not _has_event(conn, namespace, user_id, key, "use"):
                    return
                if _has_event(conn, namespace, user_id, key, "give_back"):
                    return
                row = conn.execute(
                    "UPDATE usage SET used = used - 1 "
                    "WHERE namespace = ? AND user_id = ? AND used > 0 RETURNING used",
                    (namespace, user_id),
                ).fetchone()
                if row is not None:
                    _record(conn, namespace, user_id, key, "give_back", int(row[0]))

        await self.engine.run(write)


def _used(conn: sqlite3.Connection, namespace: str, user_id: str) -> int:
    row = conn.execute(
        "SELECT used FROM usage WHERE namespace = ? AND user_id = ?", (namespace, user_id)
    ).fetchone()
    return int(row[0]) if row else 0


def _has_event(conn: sqlite3.Connection, namespace: str, user_id: str, key: str, kind: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM usage_events WHERE namespace = ? AND user_id = ? AND idempotency_key = ? AND kind = ?",
        (namespace, user_id, key, kind),
    ).fetchone()
    return row is not None


def _record(
    conn: sqlite3.Connection, namespace: str, user_id: str, key: str, kind: str, used_after: int
) -> None:
    conn.execute(
        "INSERT INTO usage_events "
        "(namespace, user_id, idempotency_key, kind, used_after, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (namespace, user_id, key, kind, used_after, _now()),
    )


# Each write is one statement, so one round trip and its own transaction. Concurrent writers of one
# user queue on the `usage` row's lock, and PostgreSQL re-checks `used < limit` on the row as the
# previous writer left it, so the limit holds across any number of processes. Two writers with the
# same key both pass the NOT EXISTS check; the second then breaks the events' unique key and its
# whole statement, counter change included, is rolled back.
PG_SPEND = """
WITH spent AS (
    INSERT INTO usage AS u (namespace, user_id, used)
    SELECT $1, $2, 1
    WHERE $4 > 0 AND NOT EXISTS (
        SELECT 1 FROM usage_events
        WHERE namespace = $1 AND user_id = $2 AND idempotency_key = $3 AND kind = 'use'
    )
    ON CONFLICT (namespace, user_id) DO UPDATE SET used = u.used + 1 WHERE u.used < $4
    RETURNING u.used
)
INSERT INTO usage_events (namespace, user_id, idempotency_key, kind, used_after, created_at)
SELECT $1, $2, $3, 'use', used, $5 FROM spent
RETURNING used_after
"""

PG_GIVE_BACK = """
WITH back AS (
    UPDATE usage SET used = used - 1
    WHERE namespace = $1 AND user_id = $2 AND used > 0
      AND EXISTS (
        SELECT 1 FROM usage_events
        WHERE namespace = $1 AND user_id = $2 AND idempotency_key = $3 AND kind = 'use'
      )
      AND NOT EXISTS (
        SELECT 1 FROM usage_events
        WHERE namespace = $1 AND user_id = $2 AND idempotency_key = $3 AND kind = 'give_back'
      )
    RETURNING used
)
INSERT INTO usage_events (namespace, user_id, idempotency_key, kind, used_after, created_at)
SELECT $1, $2, $3, 'give_back', used, $4 FROM back
"""

PG_HAS_USE = """
SELECT EXISTS (
    SELECT 1 FROM usage_events
    WHERE namespace = $1 AND user_id = $2 AND idempotency_key = $3 AND kind = 'use'
)
"""


class PostgresUsageLedger(UsageLedger):
    engine: PostgresDatabase

    schema = POSTGRES_SCHEMA

    async def used(self, namespace: str, user_id: str) -> int:
        async with self.engine.connection() as conn:
            used = await conn.fetchval(
                "SELECT used FROM usage WHERE namespace = $1 AND user_id = $2", namespace, user_id
            )
        return int(used or 0)

    async def events(self, namespace: str, user_id: str, limit: int, offset: int) -> tuple[list[Event], int]:
        async with self.engine.connection() as conn:
            rows = await conn.fetch(
                "SELECT id, kind, used_after, created_at FROM usage_events "
                "WHERE namespace = $1 AND user_id = $2 ORDER BY id DESC LIMIT $3 OFFSET $4",
                namespace,
                user_id,
                limit,
                offset,
            )
            total = await conn.fetchval(
                "SELECT COUNT(*) FROM usage_events WHERE namespace = $1 AND user_id = $2", namespace, user_id
            )
        return [(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows], int(total)

    async def spend_counted(self, namespace: str, user_id: str, key: str, limit: int) -> int | None:
        import asyncpg

        async with self.engine.connection() as conn:
            try:
                taken = await conn.fetchval(PG_SPEND, namespace, user_id, key, limit, _now())
            except asyncpg.UniqueViolationError:
                pass  # a concurrent request with this key took the use: counted below
            else:
                if taken is not None:
                    return int(taken)
                if not await _has_use(conn, namespace, user_id, key):
                    return None
            used = await conn.fetchval(
                "SELECT used FROM usage WHERE namespace = $1 AND user_id = $2", namespace, user_id
            )
            return int(used or 0)

    async def give_back(self, namespace: str, user_id: str, key: str) -> None:
        import asyncpg

        async with self.engine.connection() as conn:
            try:
                await conn.execute(PG_GIVE_BACK, namespace, user_id, key, _now())
            except asyncpg.UniqueViolationError:
                return  # a concurrent give-back of this key returned the use


async def _has_use(conn: asyncpg.Connection, namespace: str, user_id: str, key: str) -> bool:
    return bool(await conn.fetchval(PG_HAS_USE, namespace, user_id, key))
