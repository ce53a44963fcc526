"""Purchase replies kept for replays, and the claim that lets one process at a time start a purchase.

One row per user and slot: the reply to an `Idempotency-Key` (kind `key`), or the user's latest
purchase, for double clicks (kind `latest`, key ''). A row is either a claim (`claim` holds the token
of the process starting that purchase, `expires_at` ends its lease) or a reply (`sealed`, encrypted by
the caller, kept until `expires_at`). Each step below is atomic in the database, so any number of
processes sharing it agree on one purchase per slot. Times are the database's clock on PostgreSQL
(one clock for every host) and this host's on SQLite (one host).
"""

from __future__ import annotations

import abc
import sqlite3
import time
from dataclasses import dataclass
from typing import Final

from .choose import for_engine
from .engine import Engine, Migrated, Schema
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

_COLUMNS = """
    namespace       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('key', 'latest')),
    idempotency_key TEXT NOT NULL,
    claim           TEXT,
    payment_id      TEXT,
    sealed          {blob},
    expires_at      {real} NOT NULL,
    PRIMARY KEY (namespace, user_id, kind, idempotency_key)
"""

SQLITE_SCHEMA = Schema(
    "purchase_replays",
    (
        (
            f"CREATE TABLE IF NOT EXISTS purchase_replays ({_COLUMNS.format(blob='BLOB', real='REAL')})",
            "CREATE INDEX IF NOT EXISTS purchase_replays_expiry ON purchase_replays (expires_at)",
        ),
    ),
)

POSTGRES_SCHEMA = Schema(
    "purchase_replays",
    (
        (
            f"CREATE TABLE purchase_replays ({_COLUMNS.format(blob='BYTEA', real='DOUBLE PRECISION')})",
            "CREATE INDEX purchase_replays_expiry ON purchase_replays (expires_at)",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Slot:
    """A user's reply to one `Idempotency-Key`, or (`idempotency_key` None) their latest purchase."""

    namespace: str
    user_id: str
    idempotency_key: str | None

    @property
    def kind(self) -> str:
        return "latest" if self.idempotency_key is None else "key"

    @property
    def key(self) -> str:
        return self.idempotency_key or ""

    def binding(self) -> bytes:
        """What a sealed reply is bound to: a reply moved to another row does not open."""
        parts = (self.namespace, self.user_id, self.kind, self.key)
        return "\x00".join(parts).encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class Found:
    payment_id: str
    sealed: bytes


class Taken:
    """The caller now holds the slot's claim: it starts the purchase, then `fill`s or `release`s."""


class Pending:
    """Another caller holds a live claim on the slot: wait and ask again."""


TAKEN: Final = Taken()
PENDING: Final = Pending()

Claim = Found | Taken | Pending


class ReplayStore(abc.ABC):
    """Shares the engine of the payment store it sits beside, which opens and closes it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @abc.abstractmethod
    async def open(self) -> Migrated:
        """Bring the schema up to date (the engine is already open)."""

    @abc.abstractmethod
    async def claim(self, slot: Slot, token: str, lease_seconds: float, superseding: str | None) -> Claim:
        """The live reply of `slot`, a live claim of someone else's, or the claim taken for `token`
        (when the slot is free, expired, or holds the reply for `superseding`, which may be replaced)."""

    @abc.abstractmethod
    async def fill(self, slot: Slot, token: str, payment_id: str, sealed: bytes, ttl_seconds: float) -> bool:
        """Turn `token`'s claim into the reply; False when the claim was lost (its lease ran out)."""

    @abc.abstractmethod
    async def release(self, slot: Slot, token: str) -> None:
        """Give up `token`'s claim (the purchase could not be started)."""

    @abc.abstractmethod
    async def sweep(self) -> int:
        """Delete every expired row, replies and their secrets included. How many went."""


def replay_store(engine: Engine) -> ReplayStore:
    return for_engine(engine, "replay store", sqlite=SQLiteReplayStore, postgres=PostgresReplayStore)


def _slot_args(slot: Slot) -> tuple[str, str, str, str]:
    return slot.namespace, slot.user_id, slot.kind, slot.key


class SQLiteReplayStore(ReplayStore):
    engine: SQLiteDatabase

    async def open(self) -> Migrated:
        return await self.engine.migrate(SQLITE_SCHEMA)

    async def claim(self, slot: Slot, token: str, lease_seconds: float, superseding: str | None) -> Claim:
        def write(conn: sqlite3.Connection) -> Claim:
            # BEGIN IMMEDIATE: the read and the write below are one step for every process on the file.
            with transaction(conn):
                now = time.time()
                row = conn.execute(
                    "SELECT payment_id, sealed, expires_at FROM purchase_replays"
                    " WHERE namespace = ? AND user_id = ? AND kind = ? AND idempotency_key = ?",
                    _slot_args(slot),
                ).fetchone()
                if row is not None and row[2] > now:
                    if row[1] is None:
                        return PENDING
                    if row[0] != superseding:
                        return Found(str(row[0]), bytes(row[1]))
                conn.execute(
                    "INSERT OR REPLACE INTO purchase_replays (namespace, user_id, kind, idempotency_key,"
                    " claim, payment_id, sealed, expires_at) VALUES (?, ?, ?, ?, ?, NULL, NULL, ?)",
                    (*_slot_args(slot), token, now + lease_seconds),
                )
                return TAKEN

        return await self.engine.run(write)

    async def fill(self, slot: Slot, token: str, payment_id: str, sealed: bytes, ttl_seconds: float) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cursor = conn.execute(
                    "UPDATE purchase_replays SET claim = NULL, payment_id = ?, sealed = ?, expires_at = ?"
                    " WHERE namespace = ? AND user_id = ? AND kind = ? AND idempotency_key = ? AND claim = ?",
                    (payment_id, sealed, time.time() + ttl_seconds, *_slot_args(slot), token),
                )
                return cursor.rowcount == 1

        return await self.engine.run(write)

    async def release(self, slot: Slot, token: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "DELETE FROM purchase_replays"
                    " WHERE namespace = ? AND user_id = ? AND kind = ? AND idempotency_key = ? AND claim = ?",
                    (*_slot_args(slot), token),
                )

        await self.engine.run(write)

    async def sweep(self) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute(
                    "DELETE FROM purchase_replays WHERE expires_at <= ?", (time.time(),)
                ).rowcount

        return await self.engine.run(write)


# Times are `EXTRACT(EPOCH FROM now())`: the database server's clock, one for every host.

# One statement: on a conflict PostgreSQL locks the row and judges the WHERE on its latest version, so
# of two processes claiming one slot at once exactly one gets a row back.
PG_CLAIM = """
INSERT INTO purchase_replays AS r
    (namespace, user_id, kind, idempotency_key, claim, payment_id, sealed, expires_at)
VALUES ($1, $2, $3, $4, $5, NULL, NULL, EXTRACT(EPOCH FROM now())::float8 + $6)
ON CONFLICT (namespace, user_id, kind, idempotency_key) DO UPDATE
SET claim = EXCLUDED.claim, payment_id = NULL, sealed = NULL, expires_at = EXCLUDED.expires_at
WHERE r.expires_at <= EXTRACT(EPOCH FROM now())::float8
   OR (r.sealed IS NOT NULL AND r.payment_id = $7::text)
RETURNING 1
"""

PG_READ = """
SELECT payment_id, sealed FROM purchase_replays
WHERE namespace = $1 AND user_id = $2 AND kind = $3 AND idempotency_key = $4
  AND expires_at > EXTRACT(EPOCH FROM now())::float8
"""

PG_FILL = """
UPDATE purchase_replays
SET claim = NULL, payment_id = $6, sealed = $7, expires_at = EXTRACT(EPOCH FROM now())::float8 + $8
WHERE namespace = $1 AND user_id = $2 AND kind = $3 AND idempotency_key = $4 AND claim = $5
"""

PG_RELEASE = """
DELETE FROM purchase_replays
WHERE namespace = $1 AND user_id = $2 AND kind = $3 AND idempotency_key = $4 AND claim = $5
"""

PG_SWEEP = "DELETE FROM purchase_replays WHERE expires_at <= EXTRACT(EPOCH FROM now())::float8"


class PostgresReplayStore(ReplayStore):
    engine: PostgresDatabase

    async def open(self) -> Migrated:
        return await self.engine.migrate(POSTGRES_SCHEMA)

    async def claim(self, slot: Slot, token: str, lease_seconds: float, superseding: str | None) -> Claim:
        async with self.engine.connection() as conn:
            if await conn.fetchval(PG_CLAIM, *_slot_args(slot), token, lease_seconds, superseding):
                return TAKEN
            row = await conn.fetchrow(PG_READ, *_slot_args(slot))
        if row is None or row["sealed"] is None:
            # A claim of someone else's, or a row that expired since: either way, ask again shortly.
            return PENDING
        return Found(str(row["payment_id"]), bytes(row["sealed"]))

    async def fill(self, slot: Slot, token: str, payment_id: str, sealed: bytes, ttl_seconds: float) -> bool:
        async with self.engine.connection() as conn:
            done = await conn.execute(PG_FILL, *_slot_args(slot), token, payment_id, sealed, ttl_seconds)
        return bool(done == "UPDATE 1")

    async def release(self, slot: Slot, token: str) -> None:
        async with self.engine.connection() as conn:
            await conn.execute(PG_RELEASE, *_slot_args(slot), token)

    async def sweep(self) -> int:
        async with self.engine.connection() as conn:
            done = await conn.execute(PG_SWEEP)
        return int(str(done).rsplit(" ", 1)[-1])
