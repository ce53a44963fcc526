"""The usage ledger of the `simple` provider: how many free uses each user has spent, and each event."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

from .sqlite import SQLiteStore, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    namespace TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    used      INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (namespace, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_events (
    id              INTEGER PRIMARY KEY,
    namespace       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('use', 'give_back')),
    used_after      INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    UNIQUE (namespace, user_id, idempotency_key, kind)
);
"""


class UsageLedger(SQLiteStore):
    SCHEMA = SCHEMA

    async def used(self, namespace: str, user_id: str) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT used FROM usage WHERE namespace = ? AND user_id = ?", (namespace, user_id)
            ).fetchone()
            return int(row[0]) if row else 0

        return await self.db.run(read)

    async def events(
        self, namespace: str, user_id: str, limit: int, offset: int
    ) -> tuple[list[tuple[int, str, int, str]], int]:
        """(id, kind, used_after, created_at) newest first, and how many there are in all."""

        def read(conn: sqlite3.Connection) -> tuple[list[tuple[int, str, int, str]], int]:
            rows = conn.execute(
                "SELECT id, kind, used_after, created_at FROM usage_events "
                "WHERE namespace = ? AND user_id = ? ORDER BY id DESC LIMIT ? OFFSET ?",
                (namespace, user_id, limit, offset),
            ).fetchall()
            (total,) = conn.execute(
                "SELECT COUNT(*) FROM usage_events WHERE namespace = ? AND user_id = ?", (namespace, user_id)
            ).fetchone()
            return [(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows], int(total)

        return await self.db.run(read)

    async def spend(self, namespace: str, user_id: str, key: str, limit: int) -> bool:
        """Take one use if fewer than `limit` are used. False when none is left.

        A key already spent counts as spent again without taking another use.
        """

        def write(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                if _has_event(conn, namespace, user_id, key, "use"):
                    return True
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
                    return False
                _record(conn, namespace, user_id, key, "use", int(row[0]))
                return True

        return await self.db.run(write)

    async def give_back(self, namespace: str, user_id: str, key: str) -> None:
        """Return the use spent under `key`; once only, and never for a key that was not spent."""

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

        await self.db.run(write)


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
        (namespace, user_id, key, kind, used_after, datetime.now(UTC).isoformat()),
    )
