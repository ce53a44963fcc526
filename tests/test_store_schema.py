"""Schemas are versioned and upgraded in place, on both engines; data directories from before the
versioning keep working with no step of their own."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig, Identity, ProviderContext
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store import DatabaseUnavailable, PostgresDatabase, Schema, SQLiteDatabase
from ciris_billing_proxy.store.usage import usage_ledger

from .conftest import make_config
from .postgres import fetch

# The ledger as released before schema versions: no schema_version table.
UNVERSIONED_LEDGER = """
CREATE TABLE usage (
    namespace TEXT NOT NULL, user_id TEXT NOT NULL,
    used INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0), PRIMARY KEY (namespace, user_id)
) WITHOUT ROWID;
CREATE TABLE usage_events (
    id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, user_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('use', 'give_back')),
    used_after INTEGER NOT NULL, created_at TEXT NOT NULL,
    UNIQUE (namespace, user_id, idempotency_key, kind)
);
INSERT INTO usage VALUES ('local', 'ann', 3);
"""

ANN = Identity("ann", "local", "OBSERVER")


async def test_a_data_directory_from_before_schema_versions_keeps_its_usage(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "simple-usage.sqlite3") as conn:
        conn.executescript(UNVERSIONED_LEDGER)
    provider = SimpleProvider.from_context(ProviderContext(data_dir=tmp_path))
    await provider.start()
    try:
        assert (await provider.credit_status(ANN)).total_uses == 3
        await provider.spend(ANN, "k1")
        assert (await provider.credit_status(ANN)).total_uses == 4
    finally:
        await provider.stop()
    with sqlite3.connect(tmp_path / "simple-usage.sqlite3") as conn:
        assert conn.execute("SELECT component, version FROM schema_version").fetchall() == [("usage", 1)]


async def test_a_sqlite_url_keeps_the_records_in_that_file(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "billing.sqlite3"
    config = make_config(tmp_path, database_url=f"sqlite:///{path}", provider_options={})
    provider = SimpleProvider.from_context(
        ProviderContext(data_dir=config.data_dir, database_url=_url(config))
    )
    await provider.start()
    try:
        await provider.spend(ANN, "k1")
    finally:
        await provider.stop()
    assert not (tmp_path / "simple-usage.sqlite3").exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT user_id, used FROM usage").fetchall() == [("ann", 1)]


def _url(config: BillingConfig) -> str:
    assert config.database_url is not None
    return config.database_url.get_secret_value()


WIDGETS_V1 = ("CREATE TABLE widgets (name TEXT PRIMARY KEY)",)
WIDGETS_V2 = ("ALTER TABLE widgets ADD COLUMN colour TEXT", "INSERT INTO widgets VALUES ('w', 'blue')")


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return lambda: SQLiteDatabase(tmp_path / "widgets.sqlite3")
    url = parse_database_url(request.getfixturevalue("pg_url"))
    return lambda: PostgresDatabase(url)


async def test_a_schema_is_upgraded_in_place_and_a_newer_one_is_refused(engine_factory: Any) -> None:
    older, newer = Schema("widgets", (WIDGETS_V1,)), Schema("widgets", (WIDGETS_V1, WIDGETS_V2))
    engine = engine_factory()
    await engine.open()
    try:
        assert (await engine.migrate(older)).applied == 1
        assert (await engine.migrate(newer)).applied == 1
        assert (await engine.migrate(newer)).applied == 0
        with pytest.raises(DatabaseUnavailable, match="widgets records at schema version 2, newer than"):
            await engine.migrate(older)
    finally:
        await engine.close()


async def test_five_ledgers_opening_a_new_database_at_once_create_it_once(pg_url: str) -> None:
    ledgers = [usage_ledger(PostgresDatabase(parse_database_url(pg_url))) for _ in range(5)]
    try:
        opened = await asyncio.gather(*(ledger.open() for ledger in ledgers))
        assert sorted(m.applied for m in opened) == [0, 0, 0, 0, 1]
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert await fetch(pg_url, "SELECT component, version FROM schema_version") == [("usage", 1)]
