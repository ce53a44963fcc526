"""The SQLite engine: the budget of each use of the database."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from ciris_billing_proxy import ProviderUnavailable
from ciris_billing_proxy.ledger import Account, ledger_for
from ciris_billing_proxy.store import SQLiteDatabase

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
