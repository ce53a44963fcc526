"""The event outbox's records: each billing event (`balance.low`, `credit.granted`, ...) kept until it
is delivered.

An event is written in the same transaction as the change it tells of (`add_sqlite` on the
writer's SQLite connection, `add_postgres` on its asyncpg connection), so a committed change always
has its event and a rolled-back one never does. Delivery (`ciris_billing_proxy.events`: the host's
callback, signed webhooks) reads the outbox later, from any process, through `EventStore`: it claims
the events that are due for a lease (`next_attempt_at` moves past the lease, so no other process
takes them meanwhile), then marks each delivered, or failed with its next attempt after a backoff.
Times are the database's clock on PostgreSQL (one clock for every host) and this host's on SQLite.
"""

from __future__ import annotations

import abc
import json
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from .choose import for_engine
from .engine import Engine, RecordStore, Schema
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

if TYPE_CHECKING:
    import asyncpg

#: Every kind an event may have (docs/events.md).
EVENT_KINDS: Final = frozenset(
    {
        "balance.low",
        "balance.exhausted",
        "purchase.succeeded",
        "credit.granted",
        "credit.expired",
        "credit.clawed_back",
    }
)

# `once_key`: an event that must exist once whoever writes it (two processes that both see a purchase
# succeed) carries a key, and the second insert is ignored. `claim`: the process delivering it now.
# `sinks_done`: the sinks (callback, webhook) that already took it, so a retry goes to the others only.
_COLUMNS = """
    event_id        TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL,
    namespace       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    data            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    once_key        TEXT UNIQUE,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at {real} NOT NULL DEFAULT 0,
    claim           TEXT,
    sinks_done      TEXT NOT NULL DEFAULT '',
    last_error      TEXT,
    delivered_at    {real}
"""

SQLITE_SCHEMA = Schema(
    "events",
    (
        (
            "CREATE TABLE IF NOT EXISTS billing_events (seq INTEGER PRIMARY KEY,"
            + _COLUMNS.format(real="REAL")
            + ")",
            "CREATE INDEX IF NOT EXISTS billing_events_pending "
            "ON billing_events (next_attempt_at) WHERE delivered_at IS NULL",
            "CREATE INDEX IF NOT EXISTS billing_events_delivered "
            "ON billing_events (delivered_at) WHERE delivered_at IS NOT NULL",
        ),
    ),
)

POSTGRES_SCHEMA = Schema(
    "events",
    (
        (
            "CREATE TABLE billing_events (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            + _COLUMNS.format(real="DOUBLE PRECISION")
            + ")",
            "CREATE INDEX billing_events_pending ON billing_events (next_attempt_at) "
            "WHERE delivered_at IS NULL",
            "CREATE INDEX billing_events_delivered ON billing_events (delivered_at) "
            "WHERE delivered_at IS NOT NULL",
        ),
    ),
)

_INSERT: Final = (
    "INSERT INTO billing_events (event_id, kind, namespace, user_id, data, created_at, once_key) VALUES "
)


def new_event_id() -> str:
    """A receiver de-duplicates by this id: unique across processes and restarts."""
    return "evt_" + secrets.token_hex(12)


def _row(
    kind: str, namespace: str, user_id: str, data: Mapping[str, Any], once_key: str | None = None
) -> tuple[str | None, ...]:
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    body = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return (new_event_id(), kind, namespace, user_id, body, datetime.now(UTC).isoformat(), once_key)


def add_sqlite(
    conn: sqlite3.Connection, kind: str, namespace: str, user_id: str, data: Mapping[str, Any]
) -> str:
    """Keep an event in the writer's open transaction; its id."""
    row = _row(kind, namespace, user_id, data)
    conn.execute(_INSERT + "(?, ?, ?, ?, ?, ?, ?)", row)
    return str(row[0])


async def add_postgres(
    conn: asyncpg.Connection, kind: str, namespace: str, user_id: str, data: Mapping[str, Any]
) -> str:
    """Keep an event in the writer's open transaction (or as a statement of its own); its id."""
    row = _row(kind, namespace, user_id, data)
    await conn.execute(_INSERT + "($1, $2, $3, $4, $5, $6, $7)", *row)
    return str(row[0])


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as the outbox keeps it; `attempts` failed deliveries so far, `sinks_done` the sinks
    that took it already."""

    event_id: str
    kind: str
    namespace: str
    user_id: str
    data: str
    created_at: str
    attempts: int
    sinks_done: frozenset[str]


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What the metrics show of the outbox: events not delivered yet, the age of the oldest of
    them, and the most failed attempts any of them has had."""

    pending: int
    oldest_seconds: float
    most_attempts: int


_ALL: Final = (
    "SELECT seq, event_id, kind, namespace, user_id, data, created_at, attempts, sinks_done,"
    " delivered_at IS NOT NULL FROM billing_events ORDER BY seq"
)


def _stored(row: tuple[object, ...] | sqlite3.Row) -> StoredEvent:
    _seq, event_id, kind, namespace, user_id, data, created_at, attempts, done = tuple(row)
    return StoredEvent(
        str(event_id),
        str(kind),
        str(namespace),
        str(user_id),
        str(data),
        str(created_at),
        int(str(attempts)),
        frozenset(name for name in str(done).split(",") if name),
    )


def _age(created_at: str | None, now: float) -> float:
    if created_at is None:
        return 0.0
    try:
        return max(0.0, now - datetime.fromisoformat(created_at).timestamp())
    except ValueError:
        return 0.0


class EventStore(RecordStore, abc.ABC):
    """The outbox on one engine. The delivery borrows the provider's engine when the provider
    writes events itself (it is opened and closed with the provider: `prepare` only brings the
    schema up to date); otherwise it owns one (`open`, `close`)."""

    async def prepare(self) -> None:
        await self.engine.migrate(self.schema)

    @abc.abstractmethod
    async def add(
        self, kind: str, namespace: str, user_id: str, data: Mapping[str, Any], once_key: str | None = None
    ) -> str | None:
        """Keep an event on its own; its id, or None when one with `once_key` is kept already."""

    @abc.abstractmethod
    async def claim(self, token: str, lease_seconds: float, limit: int) -> list[StoredEvent]:
        """Up to `limit` undelivered events whose next attempt is due, oldest due first, held by
        `token` for `lease_seconds` (no other claim takes them meanwhile)."""

    @abc.abstractmethod
    async def delivered(self, event_id: str, sinks: frozenset[str]) -> None:
        """Every sink took the event: it is delivered."""

    @abc.abstractmethod
    async def failed(
        self, event_id: str, token: str, delay: float, sinks: frozenset[str], error: str
    ) -> None:
        """An attempt failed: one more attempt counted, the next in `delay` seconds; `sinks` took it
        already. Changes nothing once the claim is no longer `token`'s."""

    @abc.abstractmethod
    async def release(self, token: str) -> None:
        """Give up every claim `token` holds, due at once (a process stopping: the next one takes
        them without waiting for the lease)."""

    @abc.abstractmethod
    async def stats(self) -> OutboxStats: ...

    @abc.abstractmethod
    async def prune(self, delivered_before: float) -> int:
        """Forget the events delivered before this Unix time; how many."""

    @abc.abstractmethod
    async def all(self) -> list[tuple[StoredEvent, bool]]:
        """Every event, oldest first, and whether it was delivered (for tests and tools)."""


def event_store(engine: Engine) -> EventStore:
    return for_engine(engine, "event store", sqlite=SQLiteEventStore, postgres=PostgresEventStore)


def _joined(sinks: frozenset[str]) -> str:
    return ",".join(sorted(sinks))


class SQLiteEventStore(EventStore):
    engine: SQLiteDatabase

    schema = SQLITE_SCHEMA

    async def add(
        self, kind: str, namespace: str, user_id: str, data: Mapping[str, Any], once_key: str | None = None
    ) -> str | None:
        row = _row(kind, namespace, user_id, data, once_key)

        def write(conn: sqlite3.Connection) -> str | None:
            with transaction(conn):
                cursor = conn.execute(
                    "INSERT INTO billing_events (event_id, kind, namespace, user_id, data, created_at,"
                    " once_key) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (once_key) DO NOTHING",
                    row,
                )
                return str(row[0]) if cursor.rowcount else None

        return await self.engine.run(write)

    async def claim(self, token: str, lease_seconds: float, limit: int) -> list[StoredEvent]:
        def write(conn: sqlite3.Connection) -> list[StoredEvent]:
            # A look first, outside any transaction: most rounds find nothing due, and taking the
            # write lock for that would hold up the spends of every process on the file.
            due = conn.execute(
                "SELECT 1 FROM billing_events WHERE delivered_at IS NULL AND next_attempt_at <= ? LIMIT 1",
                (time.time(),),
            ).fetchone()
            if due is None:
                return []
            # BEGIN IMMEDIATE: the read and the claim are one step for every process on the file.
            with transaction(conn):
                now = time.time()
                rows = conn.execute(
                    "SELECT seq, event_id, kind, namespace, user_id, data, created_at, attempts, sinks_done"
                    " FROM billing_events WHERE delivered_at IS NULL"
                    " AND next_attempt_at <= ? ORDER BY next_attempt_at, seq LIMIT ?",
                    (now, limit),
                ).fetchall()
                conn.executemany(
                    "UPDATE billing_events SET claim = ?, next_attempt_at = ? WHERE seq = ?",
                    [(token, now + lease_seconds, row[0]) for row in rows],
                )
                return [_stored(row) for row in rows]

        return await self.engine.run(write)

    async def delivered(self, event_id: str, sinks: frozenset[str]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "UPDATE billing_events SET delivered_at = ?, claim = NULL, sinks_done = ?"
                    " WHERE event_id = ? AND delivered_at IS NULL",
                    (time.time(), _joined(sinks), event_id),
                )

        await self.engine.run(write)

    async def failed(
        self, event_id: str, token: str, delay: float, sinks: frozenset[str], error: str
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "UPDATE billing_events SET attempts = attempts + 1, next_attempt_at = ?,"
                    " claim = NULL, sinks_done = ?, last_error = ?"
                    " WHERE event_id = ? AND claim = ? AND delivered_at IS NULL",
                    (time.time() + delay, _joined(sinks), error, event_id, token),
                )

        await self.engine.run(write)

    async def release(self, token: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "UPDATE billing_events SET claim = NULL, next_attempt_at = ?"
                    " WHERE claim = ? AND delivered_at IS NULL",
                    (time.time(), token),
                )

        await self.engine.run(write)

    async def stats(self) -> OutboxStats:
        def read(conn: sqlite3.Connection) -> OutboxStats:
            pending, oldest, most = conn.execute(
                "SELECT COUNT(*), MIN(created_at), COALESCE(MAX(attempts), 0) FROM billing_events"
                " WHERE delivered_at IS NULL"
            ).fetchone()
            return OutboxStats(int(pending), _age(oldest, time.time()), int(most))

        return await self.engine.run(read)

    async def prune(self, delivered_before: float) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute(
                    "DELETE FROM billing_events WHERE delivered_at < ?", (delivered_before,)
                ).rowcount

        return await self.engine.run(write)

    async def all(self) -> list[tuple[StoredEvent, bool]]:
        def read(conn: sqlite3.Connection) -> list[tuple[StoredEvent, bool]]:
            rows = conn.execute(_ALL).fetchall()
            return [(_stored(row[:-1]), bool(row[-1])) for row in rows]

        return await self.engine.run(read)


# Times are `EXTRACT(EPOCH FROM clock_timestamp())`: the database server's clock, one for every host.
# SKIP LOCKED: two processes claiming at once each take rows the other did not lock, and the
# condition is judged again on the locked row, so an event is claimed by one of them only.
PG_CLAIM: Final = """
UPDATE billing_events AS e
SET claim = $1, next_attempt_at = EXTRACT(EPOCH FROM clock_timestamp())::float8 + $2
FROM (
    SELECT seq FROM billing_events
    WHERE delivered_at IS NULL AND next_attempt_at <= EXTRACT(EPOCH FROM clock_timestamp())::float8
    ORDER BY next_attempt_at, seq
    LIMIT $3
    FOR UPDATE SKIP LOCKED
) AS due
WHERE e.seq = due.seq
RETURNING e.seq, e.event_id, e.kind, e.namespace, e.user_id, e.data, e.created_at, e.attempts,
          e.sinks_done
"""
PG_DELIVERED: Final = """
UPDATE billing_events
SET delivered_at = EXTRACT(EPOCH FROM clock_timestamp())::float8, claim = NULL, sinks_done = $2
WHERE event_id = $1 AND delivered_at IS NULL
"""
PG_FAILED: Final = """
UPDATE billing_events
SET attempts = attempts + 1, next_attempt_at = EXTRACT(EPOCH FROM clock_timestamp())::float8 + $3,
    claim = NULL, sinks_done = $4, last_error = $5
WHERE event_id = $1 AND claim = $2 AND delivered_at IS NULL
"""
PG_RELEASE: Final = """
UPDATE billing_events SET claim = NULL, next_attempt_at = EXTRACT(EPOCH FROM clock_timestamp())::float8
WHERE claim = $1 AND delivered_at IS NULL
"""


class PostgresEventStore(EventStore):
    engine: PostgresDatabase

    schema = POSTGRES_SCHEMA

    async def add(
        self, kind: str, namespace: str, user_id: str, data: Mapping[str, Any], once_key: str | None = None
    ) -> str | None:
        row = _row(kind, namespace, user_id, data, once_key)
        async with self.engine.connection() as conn:
            status = await conn.execute(
                _INSERT + "($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (once_key) DO NOTHING", *row
            )
        return str(row[0]) if status.endswith(" 1") else None

    async def claim(self, token: str, lease_seconds: float, limit: int) -> list[StoredEvent]:
        async with self.engine.connection() as conn:
            rows = await conn.fetch(PG_CLAIM, token, lease_seconds, limit)
        return [_stored(tuple(row)) for row in sorted(rows, key=lambda row: int(row[0]))]

    async def delivered(self, event_id: str, sinks: frozenset[str]) -> None:
        async with self.engine.connection() as conn:
            await conn.execute(PG_DELIVERED, event_id, _joined(sinks))

    async def failed(
        self, event_id: str, token: str, delay: float, sinks: frozenset[str], error: str
    ) -> None:
        async with self.engine.connection() as conn:
            await conn.execute(PG_FAILED, event_id, token, delay, _joined(sinks), error)

    async def release(self, token: str) -> None:
        async with self.engine.connection() as conn:
            await conn.execute(PG_RELEASE, token)

    async def stats(self) -> OutboxStats:
        async with self.engine.connection() as conn:
            row = await conn.fetchrow(
                "SELECT COUNT(*), MIN(created_at), COALESCE(MAX(attempts), 0), "
                "EXTRACT(EPOCH FROM clock_timestamp())::float8 FROM billing_events WHERE delivered_at IS NULL"
            )
        assert row is not None
        return OutboxStats(int(row[0]), _age(row[1], float(row[3])), int(row[2]))

    async def prune(self, delivered_before: float) -> int:
        async with self.engine.connection() as conn:
            status = await conn.execute(
                "DELETE FROM billing_events WHERE delivered_at < $1", delivered_before
            )
        return int(status.rsplit(" ", 1)[-1])

    async def all(self) -> list[tuple[StoredEvent, bool]]:
        async with self.engine.connection() as conn:
            rows = await conn.fetch(_ALL)
        return [(_stored(tuple(row)[:-1]), bool(row[-1])) for row in rows]
