"""`database_url`: parsed at config time, never shown with its password."""

from __future__ import annotations

import pytest

from ciris_billing_proxy import BillingConfig, ConfigError, ProviderContext
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.store import PostgresDatabase, SQLiteDatabase

from .conftest import SECRET


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://agent:hunter2@db.internal:6543/billing", "PostgreSQL agent@db.internal:6543/billing"),
        (
            "postgres://agent:hunter2@db.internal/billing?sslmode=require",
            "PostgreSQL agent@db.internal/billing",
        ),
        ("postgresql:///billing?host=/run/postgresql", "PostgreSQL /run/postgresql/billing"),
        ("sqlite:///var/lib/agent/billing.sqlite3", "SQLite file var/lib/agent/billing.sqlite3"),
        ("sqlite:////var/lib/agent/billing.sqlite3", "SQLite file /var/lib/agent/billing.sqlite3"),
    ],
)
def test_a_database_is_described_without_its_password(url: str, shown: str) -> None:
    assert parse_database_url(url).describe() == shown


def test_the_environment_sets_it_and_nothing_shows_it() -> None:
    url = "postgresql://agent:hunter2@db.internal/billing"
    config = BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET, "CIRIS_BILLING_DATABASE_URL": url})
    assert config.database_url is not None
    assert config.database_url.get_secret_value() == url
    assert "hunter2" not in repr(config) + str(config)
    context = ProviderContext(database_url=url)
    assert "hunter2" not in repr(context)
    assert isinstance(context.database("x.sqlite3"), PostgresDatabase)


@pytest.mark.parametrize("url", ["", "sqlite://", "sqlite:///", "http://db/billing", "postgresql://db"])
def test_a_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^Invalid configuration: database_url: "):
        BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET}, database_url=url or " ")


def test_a_providers_own_file_wins_over_the_url() -> None:
    context = ProviderContext(database_url="postgresql://agent@db.internal/billing")
    engine = context.database("x.sqlite3", ":memory:")
    assert isinstance(engine, SQLiteDatabase)
    assert engine.path == ":memory:"
