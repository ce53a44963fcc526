"""What the `stripe` provider keeps about each payment beside its ownership record (`store.payments`):
how it ended, what its refunds and disputes take back, and the uses its owner still owes.

* `mark_credited` is the one step that makes a purchase credited: first wins, in one transaction with
  the `purchase.succeeded` event (`store.events`) and with the uses the owner owes, taken from this
  credit (`repay`). The ledger's grant before it is once per payment by its key; this mark is what
  `purchase/status` reads, so `succeeded` shows only once both are done.
* A clawback (refund, dispute) raises `claw_target`, what the payment should have had taken back in
  all; `begin_claw` then moves one step `clawed` -> target at a time (`claw_pending`), and whoever
  sees a step pending (its process may have died) does it again under the same ledger key, so each
  step takes once. `finish_claw` records what the step could not take as owed, once.

Shares the engine of the payment store (its `payments` table is read and marked here).
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .choose import for_engine
from .engine import Engine, Migrated, Schema
from .events import add_postgres, add_sqlite
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

_TABLES = (
    """CREATE TABLE {exists}stripe_payments (
        payment_id   TEXT PRIMARY KEY,
        namespace    TEXT NOT NULL,
        user_id      TEXT NOT NULL,
        ended        TEXT,
        grant_id     BIGINT,
        repay        INTEGER NOT NULL DEFAULT 0 CHECK (repay >= 0),
        claw_target  INTEGER NOT NULL DEFAULT 0,
        clawed       INTEGER NOT NULL DEFAULT 0,
        claw_pending INTEGER
    )""",
    """CREATE TABLE {exists}stripe_owed (
        namespace TEXT NOT NULL,
        user_id   TEXT NOT NULL,
        owed      INTEGER NOT NULL CHECK (owed >= 0),
        PRIMARY KEY (namespace, user_id)
    )""",
)
SQLITE_SCHEMA = Schema("stripe_payments", (tuple(t.format(exists="IF NOT EXISTS ") for t in _TABLES),))
POSTGRES_SCHEMA = Schema("stripe_payments", (tuple(t.format(exists="") for t in _TABLES),))

_STATE = (
    "SELECT ended, grant_id, repay, claw_target, clawed, claw_pending"
    " FROM stripe_payments WHERE payment_id = "
)


@dataclass(frozen=True, slots=True)
class PaymentState:
    ended: str | None
    grant_id: int | None
    #: Owed uses to take from this payment's grant (decided when it was credited), not yet taken.
    repay: int
    claw_target: int
    clawed: int
    claw_pending: int | None


@dataclass(frozen=True, slots=True)
class Credited:
    """`mark_credited`'s answer: the balance recorded (the first mark's) and whether this call made it."""

    balance_after: int
    first: bool


def _state(row: Any) -> PaymentState | None:
    if row is None:
        return None
    ended, grant_id, repay, target, clawed, pending = row
    return PaymentState(
        ended,
        None if grant_id is None else int(grant_id),
        int(repay),
        int(target),
        int(clawed),
        None if pending is None else int(pending),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


class StripePaymentStore(abc.ABC):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @abc.abstractmethod
    async def open(self) -> Migrated:
        """Bring the schema up to date (the engine is already open)."""

    @abc.abstractmethod
    async def add(self, payment_id: str, namespace: str, user_id: str) -> None:
        """Keep a payment just started (a payment kept already keeps its row)."""

    @abc.abstractmethod
    async def state(self, payment_id: str) -> PaymentState | None: ...

    @abc.abstractmethod
    async def end(self, payment_id: str, how: str) -> None:
        """Record that the payment failed or was canceled (the first end is kept)."""

    @abc.abstractmethod
    async def mark_credited(
        self, payment_id: str, grant_id: int, uses: int, credits_after: int, event: Mapping[str, Any]
    ) -> Credited:
        """Mark the payment credited (its grant made, leaving `credits_after` paid credit), once:
        the first call also takes what the owner owes (up to `uses`) as this payment's `repay`,
        and writes `purchase.succeeded` with `event` and the balance, in the same transaction."""

    @abc.abstractmethod
    async def finish_repay(self, payment_id: str, untaken: int) -> None:
        """The repay step is done; what it could not take (`untaken`) is owed again. Once."""

    @abc.abstractmethod
    async def raise_claw_target(self, payment_id: str, target: int) -> None:
        """What the payment should have had taken back in all is at least `target`."""

    @abc.abstractmethod
    async def begin_claw(self, payment_id: str, clawed: int, to: int) -> bool:
        """Start the step `clawed` -> `to`; False when another step is pending or `clawed` moved."""

    @abc.abstractmethod
    async def finish_claw(self, payment_id: str, clawed: int, to: int, untaken: int) -> None:
        """The step `clawed` -> `to` is done; `untaken` of it is owed by the payment's owner. Once."""

    @abc.abstractmethod
    async def owed(self, namespace: str, user_id: str) -> int: ...


def stripe_payment_store(engine: Engine) -> StripePaymentStore:
    return for_engine(
        engine, "Stripe payment store", sqlite=SQLiteStripePaymentStore, postgres=PostgresStripePaymentStore
    )


class SQLiteStripePaymentStore(StripePaymentStore):
    engine: SQLiteDatabase

    async def open(self) -> Migrated:
        return await self.engine.migrate(SQLITE_SCHEMA)

    async def add(self, payment_id: str, namespace: str, user_id: str) -> None:
        await self._write(
            "INSERT OR IGNORE INTO stripe_payments (payment_id, namespace, user_id) VALUES (?, ?, ?)",
            (payment_id, namespace, user_id),
        )

    async def state(self, payment_id: str) -> PaymentState | None:
        return await self.engine.run(
            lambda conn: _state(conn.execute(_STATE + "?", (payment_id,)).fetchone())
        )

    async def end(self, payment_id: str, how: str) -> None:
        await self._write(
            "UPDATE stripe_payments SET ended = ? WHERE payment_id = ? AND ended IS NULL", (how, payment_id)
        )

    async def mark_credited(
        self, payment_id: str, grant_id: int, uses: int, credits_after: int, event: Mapping[str, Any]
    ) -> Credited:
        def write(conn: sqlite3.Connection) -> Credited:
            with transaction(conn):
                owner = conn.execute(
                    "SELECT namespace, user_id FROM stripe_payments WHERE payment_id = ?", (payment_id,)
                ).fetchone()
                namespace, user_id = owner
                (owed,) = conn.execute(
                    "SELECT COALESCE(MAX(owed), 0) FROM stripe_owed WHERE namespace = ? AND user_id = ?",
                    (namespace, user_id),
                ).fetchone()
                repay = min(int(owed), uses)
                balance = max(credits_after - repay, 0)
                marked = conn.execute(
                    "UPDATE payments SET balance_after = ?, credited_at = ?"
                    " WHERE payment_id = ? AND balance_after IS NULL",
                    (balance, _now(), payment_id),
                ).rowcount
                if not marked:
                    (kept,) = conn.execute(
                        "SELECT balance_after FROM payments WHERE payment_id = ?", (payment_id,)
                    ).fetchone()
                    return Credited(int(kept), first=False)
                conn.execute(
                    "UPDATE stripe_payments SET grant_id = ?, repay = ? WHERE payment_id = ?",
                    (grant_id, repay, payment_id),
                )
                if repay:
                    conn.execute(
                        "UPDATE stripe_owed SET owed = owed - ? WHERE namespace = ? AND user_id = ?",
                        (repay, namespace, user_id),
                    )
                data = {**event, "balance_after": balance, "owed_repaid": repay}
                add_sqlite(conn, "purchase.succeeded", namespace, user_id, data)
                return Credited(balance, first=True)

        return await self.engine.run(write)

    async def finish_repay(self, payment_id: str, untaken: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                done = conn.execute(
                    "UPDATE stripe_payments SET repay = 0 WHERE payment_id = ? AND repay > 0", (payment_id,)
                ).rowcount
                if done and untaken:
                    _owe_sqlite(conn, payment_id, untaken)

        await self.engine.run(write)

    async def raise_claw_target(self, payment_id: str, target: int) -> None:
        await self._write(
            "UPDATE stripe_payments SET claw_target = MAX(claw_target, ?) WHERE payment_id = ?",
            (target, payment_id),
        )

    async def begin_claw(self, payment_id: str, clawed: int, to: int) -> bool:
        return bool(
            await self._write(
                "UPDATE stripe_payments SET claw_pending = ?"
                " WHERE payment_id = ? AND clawed = ? AND claw_pending IS NULL AND claw_target >= ?",
                (to, payment_id, clawed, to),
            )
        )

    async def finish_claw(self, payment_id: str, clawed: int, to: int, untaken: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                done = conn.execute(
                    "UPDATE stripe_payments SET clawed = ?, claw_pending = NULL"
                    " WHERE payment_id = ? AND clawed = ? AND claw_pending = ?",
                    (to, payment_id, clawed, to),
                ).rowcount
                if done and untaken:
                    _owe_sqlite(conn, payment_id, untaken)

        await self.engine.run(write)

    async def owed(self, namespace: str, user_id: str) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT owed FROM stripe_owed WHERE namespace = ? AND user_id = ?", (namespace, user_id)
            ).fetchone()
            return int(row[0]) if row else 0

        return await self.engine.run(read)

    async def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute(sql, args).rowcount

        return await self.engine.run(write)


def _owe_sqlite(conn: sqlite3.Connection, payment_id: str, uses: int) -> None:
    conn.execute(
        "INSERT INTO stripe_owed (namespace, user_id, owed)"
        " SELECT namespace, user_id, ? FROM stripe_payments WHERE payment_id = ?"
        " ON CONFLICT (namespace, user_id) DO UPDATE SET owed = owed + excluded.owed",
        (uses, payment_id),
    )


PG_OWE = """
INSERT INTO stripe_owed (namespace, user_id, owed)
SELECT namespace, user_id, $2 FROM stripe_payments WHERE payment_id = $1
ON CONFLICT (namespace, user_id) DO UPDATE SET owed = stripe_owed.owed + EXCLUDED.owed
"""


class PostgresStripePaymentStore(StripePaymentStore):
    engine: PostgresDatabase

    async def open(self) -> Migrated:
        return await self.engine.migrate(POSTGRES_SCHEMA)

    async def add(self, payment_id: str, namespace: str, user_id: str) -> None:
        await self._execute(
            "INSERT INTO stripe_payments (payment_id, namespace, user_id) VALUES ($1, $2, $3)"
            " ON CONFLICT (payment_id) DO NOTHING",
            payment_id,
            namespace,
            user_id,
        )

    async def state(self, payment_id: str) -> PaymentState | None:
        async with self.engine.connection() as conn:
            return _state(await conn.fetchrow(_STATE + "$1", payment_id))

    async def end(self, payment_id: str, how: str) -> None:
        await self._execute(
            "UPDATE stripe_payments SET ended = $2 WHERE payment_id = $1 AND ended IS NULL", payment_id, how
        )

    async def mark_credited(
        self, payment_id: str, grant_id: int, uses: int, credits_after: int, event: Mapping[str, Any]
    ) -> Credited:
        async with self.engine.connection() as conn, conn.transaction():
            # The payment's row locked first: of two processes marking it at once, the second
            # waits here and then finds it marked.
            owner = await conn.fetchrow(
                "SELECT p.balance_after, s.namespace, s.user_id FROM payments p"
                " JOIN stripe_payments s USING (payment_id) WHERE payment_id = $1 FOR UPDATE",
                payment_id,
            )
            if owner["balance_after"] is not None:
                return Credited(int(owner["balance_after"]), first=False)
            namespace, user_id = owner["namespace"], owner["user_id"]
            owed = await conn.fetchval(
                "SELECT owed FROM stripe_owed WHERE namespace = $1 AND user_id = $2 FOR UPDATE",
                namespace,
                user_id,
            )
            repay = min(int(owed or 0), uses)
            balance = max(credits_after - repay, 0)
            await conn.execute(
                "UPDATE payments SET balance_after = $2, credited_at = $3 WHERE payment_id = $1",
                payment_id,
                balance,
                _now(),
            )
            await conn.execute(
                "UPDATE stripe_payments SET grant_id = $2, repay = $3 WHERE payment_id = $1",
                payment_id,
                grant_id,
                repay,
            )
            if repay:
                await conn.execute(
                    "UPDATE stripe_owed SET owed = owed - $3 WHERE namespace = $1 AND user_id = $2",
                    namespace,
                    user_id,
                    repay,
                )
            data = {**event, "balance_after": balance, "owed_repaid": repay}
            await add_postgres(conn, "purchase.succeeded", namespace, user_id, data)
            return Credited(balance, first=True)

    async def finish_repay(self, payment_id: str, untaken: int) -> None:
        async with self.engine.connection() as conn, conn.transaction():
            done = await conn.execute(
                "UPDATE stripe_payments SET repay = 0 WHERE payment_id = $1 AND repay > 0", payment_id
            )
            if done == "UPDATE 1" and untaken:
                await conn.execute(PG_OWE, payment_id, untaken)

    async def raise_claw_target(self, payment_id: str, target: int) -> None:
        await self._execute(
            "UPDATE stripe_payments SET claw_target = GREATEST(claw_target, $2) WHERE payment_id = $1",
            payment_id,
            target,
        )

    async def begin_claw(self, payment_id: str, clawed: int, to: int) -> bool:
        done = await self._execute(
            "UPDATE stripe_payments SET claw_pending = $3"
            " WHERE payment_id = $1 AND clawed = $2 AND claw_pending IS NULL AND claw_target >= $3",
            payment_id,
            clawed,
            to,
        )
        return done == "UPDATE 1"

    async def finish_claw(self, payment_id: str, clawed: int, to: int, untaken: int) -> None:
        async with self.engine.connection() as conn, conn.transaction():
            done = await conn.execute(
                "UPDATE stripe_payments SET clawed = $3, claw_pending = NULL"
                " WHERE payment_id = $1 AND clawed = $2 AND claw_pending = $3",
                payment_id,
                clawed,
                to,
            )
            if done == "UPDATE 1" and untaken:
                await conn.execute(PG_OWE, payment_id, untaken)

    async def owed(self, namespace: str, user_id: str) -> int:
        async with self.engine.connection() as conn:
            owed = await conn.fetchval(
                "SELECT owed FROM stripe_owed WHERE namespace = $1 AND user_id = $2", namespace, user_id
            )
        return int(owed or 0)

    async def _execute(self, sql: str, *args: Any) -> str:
        async with self.engine.connection() as conn:
            return str(await conn.execute(sql, *args))
