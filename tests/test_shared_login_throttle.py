"""The login throttle in the database: two app instances on one database (PostgreSQL, or one SQLite
file on one host) never let more failed logins through than the limits, whichever instance each
attempt reaches, however many arrive at once; and a database outage fails closed (503)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.store import PostgresDatabase, SQLiteDatabase
from ciris_billing_proxy.store.engine import Engine
from ciris_billing_proxy.store.login_failures import Counter, login_failures

from .conftest import ClientFactory, CountingAuthenticator, make_config
from .default_paths import LOGIN
from .postgres import TcpProxy, fetch

Client = TestClient[web.Request, web.Application]
LOCKED = {"detail": "Too many login attempts"}


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_url")
        return url
    return f"sqlite:///{tmp_path / 'shared.sqlite3'}"


async def _pair(
    make_client: ClientFactory, config: BillingConfig, users: CountingAuthenticator
) -> tuple[Client, Client]:
    return (
        await make_client(config, authenticate=users),
        await make_client(config, authenticate=users),
    )


async def _login(client: Client, username: str, password: str) -> Any:
    return await client.post(LOGIN, json={"username": username, "password": password})


async def test_concurrent_failures_on_two_instances_lock_a_username_at_exactly_the_limit(
    database_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    users = CountingAuthenticator()
    config = make_config(tmp_path, database_url=database_url)
    a, b = await _pair(make_client, config, users)
    replies = await asyncio.gather(*(_login((a, b)[i % 2], "ann", "wrong") for i in range(30)))
    statuses = [r.status for r in replies]
    assert (statuses.count(401), statuses.count(429)) == (5, 25)
    assert users.calls == 5  # a refused attempt checks no password
    for client in (a, b):
        locked = await _login(client, "ann", "correct horse")
        assert (locked.status, await locked.json()) == (429, LOCKED)
        assert 895 <= int(locked.headers["Retry-After"]) <= 900
    assert (await _login(b, "bob", "battery staple")).status == 200


async def test_concurrent_failures_on_two_instances_lock_an_address_at_exactly_the_limit(
    database_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    users = CountingAuthenticator()
    config = make_config(tmp_path, database_url=database_url, login_max_failures_per_address=12)
    a, b = await _pair(make_client, config, users)
    replies = await asyncio.gather(*(_login((a, b)[i % 2], f"user{i}", "guess") for i in range(40)))
    statuses = [r.status for r in replies]
    assert (statuses.count(401), statuses.count(429)) == (12, 28)


async def test_a_success_on_one_instance_clears_the_username_on_the_other(
    database_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(tmp_path, database_url=database_url)
    a, b = await _pair(make_client, config, CountingAuthenticator())
    assert [(await _login(a, "ann", "wrong")).status for _ in range(4)] == [401] * 4
    assert (await _login(b, "ann", "correct horse")).status == 200
    assert [(await _login(b, "ann", "wrong")).status for _ in range(5)] == [401] * 5
    assert (await _login(a, "ann", "correct horse")).status == 429


async def test_the_counters_keep_no_username_in_the_clear(
    pg_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    client = await make_client(
        make_config(tmp_path, database_url=pg_url), authenticate=CountingAuthenticator()
    )
    assert (await _login(client, "Ann.Example", "wrong")).status == 401
    rows = await fetch(pg_url, "SELECT kind, key, count FROM login_failures ORDER BY kind")
    assert [(kind, count) for kind, _key, count in rows] == [("address", 1), ("user", 1)]
    assert "ann" not in str(rows[1][1]).lower()


async def test_a_database_outage_fails_login_closed_with_503_json(
    pg_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    target = URL(pg_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    try:
        users = CountingAuthenticator()
        client = await make_client(
            make_config(tmp_path, database_url=proxy.url_for(pg_url)), authenticate=users
        )
        assert (await _login(client, "ann", "wrong")).status == 401
        await proxy.cut()
        for password in ("wrong", "correct horse"):
            reply = await _login(client, "ann", password)
            assert (reply.status, await reply.json()) == (503, {"detail": "Billing service unavailable"})
        assert users.calls == 1  # no password was checked while the counters could not be
        await proxy.restore()
        assert (await _login(client, "ann", "correct horse")).status == 200
    finally:
        await proxy.cut()


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "postgresql":
        return PostgresDatabase(parse_database_url(request.getfixturevalue("pg_url")))
    return SQLiteDatabase(tmp_path / "throttle.sqlite3")


async def test_closed_windows_open_again_and_are_swept_from_the_database(engine: Engine) -> None:
    failures = login_failures(engine)
    await failures.open()
    try:
        user = Counter("user", "digest", 1)
        address = Counter("address", "127.0.0.1", 10)
        assert await failures.admit((user, address), 3600) is None
        wait = await failures.admit((user, address), 3600)
        assert wait is not None
        assert 3590 < wait <= 3600
        other = Counter("user", "other", 1)
        assert await failures.admit((other,), 0.0) is None  # a window that closes at once
        assert await failures.admit((other,), 0.0) is None
        assert await failures.sweep() == 1
        await failures.succeeded(user, address)
        assert await failures.admit((user, address), 3600) is None
    finally:
        await failures.close()
