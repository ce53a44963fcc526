"""The engine a `database_url` names, and the change feed of a configuration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..database_budget import DEFAULT_BUDGET, DatabaseBudget
from ..database_url import DatabaseURL, parse_database_url
from .changes import ChangeFeed
from .engine import Engine
from .feed_postgres import PostgresChangeFeed
from .feed_sqlite import SQLiteChangeFeed
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase

R = TypeVar("R")


def for_engine(
    engine: Engine,
    what: str,
    *,
    sqlite: Callable[[SQLiteDatabase], R],
    postgres: Callable[[PostgresDatabase], R],
) -> R:
    """The implementation of one kind of record for `engine` (each kind has one per engine)."""
    if isinstance(engine, PostgresDatabase):
        return postgres(engine)
    if isinstance(engine, SQLiteDatabase):
        return sqlite(engine)
    raise TypeError(f"no {what} for the {engine.dialect} engine")


def engine_for(url: DatabaseURL, budget: DatabaseBudget = DEFAULT_BUDGET) -> Engine:
    if url.dialect == "postgresql":
        return PostgresDatabase(url, max_size=budget.pool_size, timeout=budget.timeout_seconds)
    return SQLiteDatabase(url.target, timeout=budget.timeout_seconds)


#: The change feed's file in the data directory when no `database_url` is set: every process of one
#: data directory shares it.
CHANGES_FILE = "changes.sqlite3"


def change_feed_for(
    database_url: str | None, data_dir: Path, budget: DatabaseBudget = DEFAULT_BUDGET
) -> ChangeFeed:
    """The feed on the database every process of the agent shares (`database_url`, validated by
    `BillingConfig`), else on a file of the data directory."""
    if database_url is None:
        return SQLiteChangeFeed(data_dir / CHANGES_FILE, budget)
    url = parse_database_url(database_url)
    if url.dialect == "postgresql":
        return PostgresChangeFeed(url, budget)
    return SQLiteChangeFeed(url.target, budget)
