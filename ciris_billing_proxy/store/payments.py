"""Who started which payment: the `ciris` provider's ownership record, since the backend keeps none.

One row per PaymentIntent this agent created: the owner, the uses bought, the paid balance when it
was started (to tell when the webhook's credits have landed), and, once they have, the balance after.
One interface, one implementation per engine (`payment_store(engine)` picks it); on PostgreSQL every
process of the agent sees every payment, so a purchase started on one is followed up on another.
"""

from __future__ import annotations

import abc
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from ..identity import Identity
from .choose import for_engine
from .engine import Engine, RecordStore, Schema
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

_COLUMNS = """
    payment_id        TEXT PRIMARY KEY,
    namespace         TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    uses              INTEGER NOT NULL,
    amount_minor      {integer} NOT NULL,
    currency          TEXT NOT NULL,
    balance_before    {integer} NOT NULL,
    created_at        TEXT NOT NULL,
    succeeded_seen_at {real},
    credited_at       TEXT,
    balance_after     {integer}
"""

SQLITE_SCHEMA = Schema(
    "payments",
    (
        (
            f"CREATE TABLE IF NOT EXISTS payments ({_COLUMNS.format(integer='INTEGER', real='REAL')})",
            "CREATE INDEX IF NOT EXISTS payments_owner ON payments (namespace, user_id)",
        ),
    ),
)

POSTGRES_SCHEMA = Schema(
    "payments",
    (
        (
            f"CREATE TABLE payments ({_COLUMNS.format(integer='BIGINT', real='DOUBLE PRECISION')})",
            "CREATE INDEX payments_owner ON payments (namespace, user_id)",
        ),
    ),
)

_SELECT = (
    "SELECT payment_id, namespace, user_id, uses, amount_minor, currency, balance_before,"
    " succeeded_seen_at, balance_after FROM payments WHERE payment_id = "
)


@dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str
    namespace: str
    user_id: str
    uses: int
    amount_minor: int
    currency: str
    balance_before: int
    succeeded_seen_at: float | None
    balance_after: int | None

    def owned_by(self, identity: Identity) -> bool:
        return (self.namespace, self.user_id) == (identity.namespace, identity.user_id)

    @property
    def credited(self) -> bool:
        return self.balance_after is not None


class PaymentStore(RecordStore, abc.ABC):
    """Opened and closed with the provider that owns it; `open` brings the schema up to date."""

    @abc.abstractmethod
    async def record(
        self,
        payment_id: str,
        owner: Identity,
        *,
        uses: int,
        amount_minor: int,
        currency: str,
        balance_before: int,
    ) -> None:
        """Keep a payment just started; a payment already recorded keeps its first record."""

    @abc.abstractmethod
    async def get(self, payment_id: str) -> Payment | None: ...

    @abc.abstractmethod
    async def started_since(self, owner: Identity, since: float) -> list[float]:
        """When each payment of `owner` recorded at `since` (seconds since the epoch) or later was
        started, oldest first."""

    @abc.abstractmethod
    async def seen_succeeded(self, payment_id: str) -> float:
        """When Stripe was first seen reporting success for this payment (recorded now if never)."""

    @abc.abstractmethod
    async def mark_credited(self, payment_id: str, balance_after: int) -> int:
        """Record that the credits landed; the first recorded balance wins. Returns it."""


def payment_store(engine: Engine) -> PaymentStore:
    return for_engine(engine, "payment store", sqlite=SQLitePaymentStore, postgres=PostgresPaymentStore)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _iso(moment: float) -> str:
    # The same shape as `_now`: ISO 8601 texts of one shape in UTC order as the times they name.
    return datetime.fromtimestamp(moment, UTC).isoformat()


def _seconds(rows: list[str]) -> list[float]:
    return [datetime.fromisoformat(created).timestamp() for created in rows]


class SQLitePaymentStore(PaymentStore):
    engine: SQLiteDatabase

    schema = SQLITE_SCHEMA

    async def record(
        self,
        payment_id: str,
        owner: Identity,
        *,
        uses: int,
        amount_minor: int,
        currency: str,
        balance_before: int,
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO payments (payment_id, namespace, user_id, uses, amount_minor,"
                    " currency, balance_before, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        payment_id,
                        owner.namespace,
                        owner.user_id,
                        uses,
                        amount_minor,
                        currency,
                        balance_before,
                        _now(),
                    ),
                )

        await self.engine.run(write)

    async def get(self, payment_id: str) -> Payment | None:
        def read(conn: sqlite3.Connection) -> Payment | None:
            row = conn.execute(_SELECT + "?", (payment_id,)).fetchone()
            return Payment(*row) if row else None

        return await self.engine.run(read)

    async def started_since(self, owner: Identity, since: float) -> list[float]:
        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT created_at FROM payments WHERE namespace = ? AND user_id = ? AND created_at >= ?"
                " ORDER BY created_at",
                (owner.namespace, owner.user_id, _iso(since)),
            ).fetchall()
            return [str(created) for (created,) in rows]

        return _seconds(await self.engine.run(read))

    async def seen_succeeded(self, payment_id: str) -> float:
        def write(conn: sqlite3.Connection) -> float:
            with transaction(conn):
                conn.execute(
                    "UPDATE payments SET succeeded_seen_at = ? "
                    "WHERE payment_id = ? AND succeeded_seen_at IS NULL",
                    (time.time(), payment_id),
                )
                row = conn.execute(
                    "SELECT succeeded_seen_at FROM payments WHERE payment_id = ?", (payment_id,)
                ).fetchone()
                return float(row[0])

        return await self.engine.run(write)

    async def mark_credited(self, payment_id: str, balance_after: int) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                conn.execute(
                    "UPDATE payments SET credited_at = ?, balance_after = ? "
                    "WHERE payment_id = ? AND balance_after IS NULL",
                    (_now(), balance_after, payment_id),
                )
                row = conn.execute(
                    "SELECT balance_after FROM payments WHERE payment_id = ?", (payment_id,)
                ).fetchone()
                return int(row[0])

        return await self.engine.run(write)


class PostgresPaymentStore(PaymentStore):
    engine: PostgresDatabase

    schema = POSTGRES_SCHEMA

    async def record(
        self,
        payment_id: str,
        owner: Identity,
        *,
        uses: int,
        amount_minor: int,
        currency: str,
        balance_before: int,
    ) -> None:
        async with self.engine.connection() as conn:
            await conn.execute(
                "INSERT INTO payments (payment_id, namespace, user_id, uses, amount_minor, currency,"
                " balance_before, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                " ON CONFLICT (payment_id) DO NOTHING",
                payment_id,
                owner.namespace,
                owner.user_id,
                uses,
                amount_minor,
                currency,
                balance_before,
                _now(),
            )

    async def get(self, payment_id: str) -> Payment | None:
        async with self.engine.connection() as conn:
            row = await conn.fetchrow(_SELECT + "$1", payment_id)
        return Payment(*row) if row else None

    # COALESCE keeps the first value: one statement, so concurrent callers in any process agree.
    async def started_since(self, owner: Identity, since: float) -> list[float]:
        async with self.engine.connection() as conn:
            rows = await conn.fetch(
                "SELECT created_at FROM payments WHERE namespace = $1 AND user_id = $2 AND created_at >= $3"
                " ORDER BY created_at",
                owner.namespace,
                owner.user_id,
                _iso(since),
            )
        return _seconds([str(row["created_at"]) for row in rows])

    async def seen_succeeded(self, payment_id: str) -> float:
        async with self.engine.connection() as conn:
            seen = await conn.fetchval(
                "UPDATE payments SET succeeded_seen_at = COALESCE(succeeded_seen_at, $2)"
                " WHERE payment_id = $1 RETURNING succeeded_seen_at",
                payment_id,
                time.time(),
            )
        return float(seen)

    async def mark_credited(self, payment_id: str, balance_after: int) -> int:
        async with self.engine.connection() as conn:
            balance = await conn.fetchval(
                "UPDATE payments SET balance_after = COALESCE(balance_after, $2),"
                " credited_at = COALESCE(credited_at, $3) WHERE payment_id = $1 RETURNING balance_after",
                payment_id,
                balance_after,
                _now(),
            )
        return int(balance)
