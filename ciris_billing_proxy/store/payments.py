"""Who started which payment: the `ciris` provider's ownership record, since the backend keeps none.

One row per PaymentIntent this agent created: the owner, the uses bought, the paid balance when it
was started (to tell when the webhook's credits have landed), and, once they have, the balance after.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from ..identity import Identity
from .sqlite import SQLiteStore, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    payment_id        TEXT PRIMARY KEY,
    namespace         TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    uses              INTEGER NOT NULL,
    amount_minor      INTEGER NOT NULL,
    currency          TEXT NOT NULL,
    balance_before    INTEGER NOT NULL,
    created_at        TEXT NOT NULL,
    succeeded_seen_at REAL,
    credited_at       TEXT,
    balance_after     INTEGER
);
CREATE INDEX IF NOT EXISTS payments_owner ON payments (namespace, user_id);
"""


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


class PaymentStore(SQLiteStore):
    SCHEMA = SCHEMA

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
                        datetime.now(UTC).isoformat(),
                    ),
                )

        await self.db.run(write)

    async def get(self, payment_id: str) -> Payment | None:
        def read(conn: sqlite3.Connection) -> Payment | None:
            row = conn.execute(
                "SELECT payment_id, namespace, user_id, uses, amount_minor, currency, balance_before,"
                " succeeded_seen_at, balance_after FROM payments WHERE payment_id = ?",
                (payment_id,),
            ).fetchone()
            return Payment(*row) if row else None

        return await self.db.run(read)

    async def seen_succeeded(self, payment_id: str) -> float:
        """When Stripe was first seen reporting success for this payment (recorded now if never)."""

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

        return await self.db.run(write)

    async def mark_credited(self, payment_id: str, balance_after: int) -> int:
        """Record that the credits landed; the first recorded balance wins. Returns it."""

        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                conn.execute(
                    "UPDATE payments SET credited_at = ?, balance_after = ? "
                    "WHERE payment_id = ? AND balance_after IS NULL",
                    (datetime.now(UTC).isoformat(), balance_after, payment_id),
                )
                row = conn.execute(
                    "SELECT balance_after FROM payments WHERE payment_id = ?", (payment_id,)
                ).fetchone()
                return int(row[0])

        return await self.db.run(write)
