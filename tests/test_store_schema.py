"""Schemas are versioned and upgraded in place, on both engines; data directories from before the
versioning keep working with no step of their own."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig, Identity, ProviderContext
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.ledger import Account, ledger_for
from ciris_billing_proxy.ledger.schema import SQLITE_SCHEMA as SQLITE_LEDGER
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store import DatabaseUnavailable, PostgresDatabase, Schema, SQLiteDatabase

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
        assert conn.execute("SELECT component, version FROM schema_version ORDER BY 1").fetchall() == [
            ("events", 1),
            ("ledger", 1),
            ("ledger", 2),
        ]


async def test_a_ledger_of_version_1_keeps_its_journal_and_its_checks_in_version_2(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as conn:  # the ledger as version 1 left it, with a spend
        conn.execute(
            "CREATE TABLE schema_version (component TEXT NOT NULL, version INTEGER NOT NULL,"
            " applied_at TEXT NOT NULL, PRIMARY KEY (component, version))"
        )
        for statement in SQLITE_LEDGER.steps[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES ('ledger', 1, '2026-01-01T00:00:00+00:00')")
    ledger = ledger_for(SQLiteDatabase(path), signup=lambda _: 10)
    await ledger.open()
    try:
        account = Account("local", "ann")
        assert await ledger.spend(account, "k1")
        await ledger.give_back(account, "k1")
        assert await ledger.spend(account, "k2")
        assert await ledger.spend(account, "k2")  # the same key: answered, not spent again
        assert (await ledger.balance(account)).used == 1
    finally:
        await ledger.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute(
            "SELECT MAX(version) FROM schema_version WHERE component = 'ledger'"
        ).fetchone() == (2,)
        assert conn.execute(
            "SELECT state FROM credit_entries WHERE kind = 'spend' ORDER BY id"
        ).fetchall() == [
            ("given_back",),
            ("spent",),
        ]
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE credit_entries SET state = 'lost' WHERE kind = 'spend'")
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute("UPDATE credit_entries SET idempotency_key = 'k2' WHERE idempotency_key = 'k1'")


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
        assert conn.execute("SELECT user_id, used FROM credit_accounts").fetchall() == [("ann", 1)]


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
    ledgers = [ledger_for(PostgresDatabase(parse_database_url(pg_url))) for _ in range(5)]
    try:
        opened = await asyncio.gather(*(ledger.open() for ledger in ledgers))
        assert sorted(m.applied for m in opened) == [0, 0, 0, 0, 2]
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert await fetch(pg_url, "SELECT component, version FROM schema_version ORDER BY 1") == [
        ("events", 1),
        ("ledger", 1),
        ("ledger", 2),
    ]


def _open_at_once(path: Path, barrier: Any, results: Any) -> None:
    async def open_and_close() -> None:
        database = SQLiteDatabase(path)
        barrier.wait()
        try:
            await database.open()
            results.put("opened")
        except sqlite3.Error as exc:
            results.put(repr(exc))
        await database.close()

    asyncio.run(open_and_close())


def test_processes_opening_one_new_sqlite_file_at_once_all_open_it(tmp_path: Path) -> None:
    """Workers starting together on a new data directory: switching a new file to WAL can fail at
    once with "database is locked" in all but one of them (it happened about once in 120 opens)."""
    context = multiprocessing.get_context("fork")
    outcomes: list[str] = []
    for round_no in range(60):
        barrier, results = context.Barrier(6), context.Queue()
        path = tmp_path / f"round-{round_no}.sqlite3"
        processes = [context.Process(target=_open_at_once, args=(path, barrier, results)) for _ in range(6)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        outcomes += [results.get(timeout=5) for _ in processes]
    assert set(outcomes) == {"opened"}, [o for o in outcomes if o != "opened"]
