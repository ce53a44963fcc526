"""The login throttle's counters: failed logins per username digest and per client address, each in a
fixed window that opens with its first failure.

One interface, one implementation per engine (`login_failures(engine)` picks it). `admit` is one
atomic step for every process on the database: the check of both counters and the count of the
attempt (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction holding an advisory lock per counter,
taken addresses first, then usernames, so two logins never wait on each other in a cycle). Times
are the database's clock on PostgreSQL (one clock for every host) and this host's on SQLite.
"""

from __future__ import annotations

import abc
import sqlite3
import time
from dataclasses import dataclass
from typing import Final

from .choose import for_engine
from .engine import Engine, RecordStore, Schema
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

_TABLE = """CREATE TABLE {exists}login_failures (
    kind       TEXT NOT NULL CHECK (kind IN ('user', 'address')),
    key        TEXT NOT NULL,
    count      INTEGER NOT NULL,
    window_end {real} NOT NULL,
    PRIMARY KEY (kind, key)
)"""

SQLITE_SCHEMA = Schema(
    "login_failures",
    (
        (
            _TABLE.format(exists="IF NOT EXISTS ", real="REAL"),
            "CREATE INDEX IF NOT EXISTS login_failures_expiry ON login_failures (window_end)",
        ),
    ),
)

POSTGRES_SCHEMA = Schema(
    "login_failures",
    (
        (
            _TABLE.format(exists="", real="DOUBLE PRECISION"),
            "CREATE INDEX login_failures_expiry ON login_failures (window_end)",
        ),
    ),
)

#: Advisory lock classes (`pg_advisory_xact_lock(class, hashtext(key))`), one per kind of counter.
ADDRESS_LOCK: Final = 0x434C4641  # "CLFA"
USER_LOCK: Final = 0x434C4655  # "CLFU"


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter an attempt is checked against and counted in; a limit of 0 is not counted."""

    kind: str
    key: str
    limit: int


class LoginFailures(RecordStore, abc.ABC):
    @abc.abstractmethod
    async def admit(self, counters: tuple[Counter, ...], window_seconds: float) -> float | None:
        """None, with one failure counted in each counter; or, counting nothing, the seconds until
        the counter at its limit whose window closes last lets attempts through again."""

    @abc.abstractmethod
    async def succeeded(self, user: Counter, address: Counter) -> None:
        """Clear the username's failures; take one back from the address's."""

    @abc.abstractmethod
    async def sweep(self) -> int:
        """Delete every counter whose window has closed. How many went."""


def login_failures(engine: Engine) -> LoginFailures:
    return for_engine(
        engine, "login failure counters", sqlite=SQLiteLoginFailures, postgres=PostgresLoginFailures
    )


#: (kind, key) -> (count, window_end) of the live counters found.
Found = dict[tuple[str, str], tuple[int, float]]


def _wait(found: Found, counters: tuple[Counter, ...], now: float) -> float:
    waits = [
        found[(c.kind, c.key)][1] - now
        for c in counters
        if (c.kind, c.key) in found and found[(c.kind, c.key)][0] >= c.limit
    ]
    # Only live windows are in `found`, so a wait is positive; the floor guards against rounding.
    return max((max(w, 1e-3) for w in waits), default=0.0)


def _counted(
    found: Found, counters: tuple[Counter, ...], now: float, window: float
) -> list[tuple[str, str, int, float]]:
    rows = []
    for c in counters:
        count, end = found.get((c.kind, c.key), (0, now + window))
        rows.append((c.kind, c.key, count + 1, end))
    return rows


class SQLiteLoginFailures(LoginFailures):
    engine: SQLiteDatabase

    schema = SQLITE_SCHEMA

    async def admit(self, counters: tuple[Counter, ...], window_seconds: float) -> float | None:
        def write(conn: sqlite3.Connection) -> float | None:
            with transaction(conn):
                now = time.time()
                found: Found = {}
                for c in counters:
                    row = conn.execute(
                        "SELECT count, window_end FROM login_failures"
                        " WHERE kind = ? AND key = ? AND window_end > ?",
                        (c.kind, c.key, now),
                    ).fetchone()
                    if row is not None:
                        found[(c.kind, c.key)] = (int(row[0]), float(row[1]))
                wait = _wait(found, counters, now)
                if wait > 0:
                    return wait
                conn.executemany(
                    "INSERT OR REPLACE INTO login_failures (kind, key, count, window_end)"
                    " VALUES (?, ?, ?, ?)",
                    _counted(found, counters, now, window_seconds),
                )
                return None

        return await self.engine.run(write)

    async def succeeded(self, user: Counter, address: Counter) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("DELETE FROM login_failures WHERE kind = ? AND key = ?", (user.kind, user.key))
                conn.execute(
                    "UPDATE login_failures SET count = count - 1"
                    " WHERE kind = ? AND key = ? AND count > 0 AND window_end > ?",
                    (address.kind, address.key, time.time()),
                )

        await self.engine.run(write)

    async def sweep(self) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute(
                    "DELETE FROM login_failures WHERE window_end <= ?", (time.time(),)
                ).rowcount

        return await self.engine.run(write)


PG_LOCK = "SELECT pg_advisory_xact_lock($1::int4, hashtext($2)), EXTRACT(EPOCH FROM now())::float8"

PG_READ = """
SELECT count, window_end FROM login_failures WHERE kind = $1 AND key = $2 AND window_end > $3
"""

PG_COUNT = """
INSERT INTO login_failures AS f (kind, key, count, window_end) VALUES ($1, $2, $3, $4)
ON CONFLICT (kind, key) DO UPDATE SET count = EXCLUDED.count, window_end = EXCLUDED.window_end
"""

PG_TAKE_BACK = """
UPDATE login_failures SET count = count - 1
WHERE kind = $1 AND key = $2 AND count > 0 AND window_end > EXTRACT(EPOCH FROM now())::float8
"""

PG_SWEEP = "DELETE FROM login_failures WHERE window_end <= EXTRACT(EPOCH FROM now())::float8"


class PostgresLoginFailures(LoginFailures):
    engine: PostgresDatabase

    schema = POSTGRES_SCHEMA

    async def admit(self, counters: tuple[Counter, ...], window_seconds: float) -> float | None:
        ordered = sorted(counters, key=lambda c: c.kind)  # 'address' before 'user'
        now = 0.0
        async with self.engine.connection() as conn, conn.transaction():
            for c in ordered:
                row = await conn.fetchrow(PG_LOCK, ADDRESS_LOCK if c.kind == "address" else USER_LOCK, c.key)
                now = float(row[1])
            found: Found = {}
            for c in ordered:
                row = await conn.fetchrow(PG_READ, c.kind, c.key, now)
                if row is not None:
                    found[(c.kind, c.key)] = (int(row[0]), float(row[1]))
            wait = _wait(found, counters, now)
            if wait > 0:
                return wait
            await conn.executemany(PG_COUNT, _counted(found, counters, now, window_seconds))
        return None

    async def succeeded(self, user: Counter, address: Counter) -> None:
        async with self.engine.connection() as conn:
            await conn.execute("DELETE FROM login_failures WHERE kind = $1 AND key = $2", user.kind, user.key)
            await conn.execute(PG_TAKE_BACK, address.kind, address.key)

    async def sweep(self) -> int:
        async with self.engine.connection() as conn:
            done = await conn.execute(PG_SWEEP)
        return int(str(done).rsplit(" ", 1)[-1])
