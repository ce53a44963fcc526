"""`ciris-billing-proxy migrate`: bring a database's schemas up to date without starting a server.

Every process also does this when it starts (under the same lock), so running it is optional; it is
for operators who change schemas in a deployment step of their own, before new processes start.
"""

from __future__ import annotations

from ..config import ConfigError
from ..database_url import parse_database_url
from ..ledger import schema as ledger
from . import audit, events, feed_postgres, feed_sqlite, give_backs, login_failures, payments, replays
from .choose import engine_for
from .engine import Migrated

SCHEMAS = {
    "sqlite": (
        ledger.SQLITE_SCHEMA,
        payments.SQLITE_SCHEMA,
        replays.SQLITE_SCHEMA,
        login_failures.SQLITE_SCHEMA,
        feed_sqlite.SCHEMA,
        give_backs.SQLITE_SCHEMA,
        audit.SQLITE_SCHEMA,
        events.SQLITE_SCHEMA,
    ),
    "postgresql": (
        ledger.POSTGRES_SCHEMA,
        payments.POSTGRES_SCHEMA,
        replays.POSTGRES_SCHEMA,
        login_failures.POSTGRES_SCHEMA,
        feed_postgres.SCHEMA,
        give_backs.POSTGRES_SCHEMA,
        audit.POSTGRES_SCHEMA,
        events.POSTGRES_SCHEMA,
    ),
}


async def migrate(database_url: str) -> str:
    """Apply every built-in record kind's missing schema steps; a one-line summary.

    `ConfigError` for a bad URL, `DatabaseUnavailable` (a `ConfigError`) when it cannot be reached."""
    try:
        url = parse_database_url(database_url)
    except ValueError as exc:
        raise ConfigError(f"Invalid configuration: database_url: {exc}") from None
    engine = engine_for(url)
    await engine.open()
    try:
        done = [await engine.migrate(schema) for schema in SCHEMAS[url.dialect]]
    finally:
        await engine.close()
    return f"{engine.describe()}: " + ", ".join(_describe(m) for m in done)


def _describe(migrated: Migrated) -> str:
    state = f"{migrated.applied} step(s) applied" if migrated.applied else "up to date"
    return f"{migrated.name} at version {migrated.version} ({state})"
