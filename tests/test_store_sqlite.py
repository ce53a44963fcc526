"""The SQLite engine: the budget of each use of the database."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from ciris_billing_proxy import ProviderUnavailable
from ciris_billing_proxy.ledger import Account, ledger_for
from ciris_billing_proxy.store import SQLiteDatabase
from ciris_billing_proxy.store.sqlite import transaction

ANN = Account("local", "ann")


async def test_a_use_waits_no_longer_than_its_budget_for_a_locked_file(tmp_path: Path) -> None:
    """Each use gets `timeout` in all: queued uses behind a locked one fail as unavailable instead
    of each waiting a whole busy timeout in turn."""
    path = tmp_path / "billing.sqlite3"
    ledger = ledger_for(SQLiteDatabase(path, timeout=0.3), signup=lambda _: 100)
    await ledger.open()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        spends = [ledger.spend(ANN, f"k{n}") for n in range(20)]
        results = await asyncio.wait_for(asyncio.gather(*spends, return_exceptions=True), 10)
        assert all(isinstance(result, ProviderUnavailable) for result in results)
        # Those that never got a turn say so: nothing of theirs was applied.
        assert any(not result.maybe_applied for result in results if isinstance(result, ProviderUnavailable))
        holder.execute("ROLLBACK")
        assert await ledger.spend(ANN, "after")
        assert (await ledger.balance(ANN)).used == 1
    finally:
        holder.close()
        await ledger.close()


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_a_budget_must_be_positive(seconds: float) -> None:
    from pydantic import ValidationError

    from ciris_billing_proxy import BillingConfig, JWTConfig

    with pytest.raises(ValidationError):
        BillingConfig(jwt=JWTConfig(secret="s" * 64), database_timeout_seconds=seconds)


async def test_a_use_runs_on_the_loop_when_the_lock_is_free_and_waits_on_the_worker_when_not(
    tmp_path: Path,
) -> None:
    """No thread hand-off while nothing is queued and no other connection holds the write lock;
    under another process's lock the use fails at once on the loop, having written nothing, and
    the worker waits for the lock: each write made once."""
    path = tmp_path / "billing.sqlite3"
    db = SQLiteDatabase(path, timeout=5)
    await db.open()
    threads: list[int] = []

    def insert(conn: sqlite3.Connection) -> int:
        threads.append(threading.get_ident())
        with transaction(conn):
            conn.execute("INSERT INTO t (n) VALUES (1)")
        return int(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])

    def create(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")

    holder = sqlite3.connect(path, isolation_level=None)
    try:
        await db.run(create)
        await asyncio.sleep(0)  # the first use's checkpoint settled
        assert await db.run(insert) == 1
        assert threads == [threading.get_ident()]  # on the loop
        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.3, holder.execute, "COMMIT")
        threads.clear()
        assert await db.run(insert) == 2  # not 3: the attempt on the loop wrote nothing
        assert len(threads) == 2
        assert threads[0] == threading.get_ident() != threads[1]
    finally:
        holder.close()
        await db.close()


async def test_a_use_that_wrote_outside_a_transaction_is_never_run_twice(tmp_path: Path) -> None:
    """A use failing on the loop after a statement of its own was kept (autocommit) is not handed
    to the worker to run again: it fails as unavailable, its write made once."""
    path = tmp_path / "billing.sqlite3"
    db = SQLiteDatabase(path, timeout=0.3)
    await db.open()
    holder = sqlite3.connect(path, isolation_level=None)
    runs: list[int] = []

    def write_then_lock(conn: sqlite3.Connection) -> None:
        runs.append(1)
        conn.execute("INSERT INTO t (n) VALUES (1)")  # autocommit: kept
        holder.execute("BEGIN IMMEDIATE")  # another process takes the lock meanwhile
        conn.execute("BEGIN IMMEDIATE")

    try:
        await db.run(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)"))
        await asyncio.sleep(0)
        with pytest.raises(ProviderUnavailable):
            await db.run(write_then_lock)
        holder.execute("ROLLBACK")
        assert runs == [1]
        assert await db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM t").fetchone()[0]) == 1
    finally:
        holder.close()
        await db.close()
