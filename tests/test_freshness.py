"""Freshness across processes: a change made through one app instance reaches the other's cache and
token checks through the change feed, on PostgreSQL (LISTEN/NOTIFY) and on a shared SQLite file.

Each "process" is an app instance of its own (its own cache, verifier and feed) on one database;
`tests/test_workers.py` does the same with real processes. Waits are bounded polls, well under the
15 s cache lifetime, so only the feed can make them pass; their speed is never asserted.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from ciris_billing_proxy import BillingConfig, BillingService, Identity, ProviderContext
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.ledger import Account
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store.feed_postgres import PostgresChangeFeed
from ciris_billing_proxy.store.feed_sqlite import SQLiteChangeFeed
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import INTERACT, agent_routes
from .conftest import SECRET, ClientFactory, make_config
from .default_paths import CREDITS, GOOGLE_PLAY, INITIATE, LOGOUT, STATUS
from .postgres import TcpProxy, fetch
from .test_auth_routes import authenticate, bearer, login

Client = TestClient[web.Request, web.Application]

#: Far below the cache's 15 s: passing within it proves the change was heard, not expired.
BOUND_SECONDS = 5.0


async def eventually(check: Callable[[], Awaitable[bool]], within: float = BOUND_SECONDS) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "not seen in time"
        await asyncio.sleep(0.02)


def service(client: Client) -> BillingService:
    return client.app[SERVICE_KEY]


async def used_seen_by(client: Client, headers: dict[str, str]) -> int:
    reply = await client.get(CREDITS, headers=headers)
    assert reply.status == 200
    used: int = (await reply.json())["total_uses"]
    return used


async def shows(client: Client, headers: dict[str, str], used: int) -> bool:
    return await used_seen_by(client, headers) == used


async def two_apps(make_client: ClientFactory, config: BillingConfig) -> tuple[Client, Client]:
    a = await make_client(config, host=agent_routes, authenticate=authenticate)
    return a, await make_client(config, host=agent_routes, authenticate=authenticate)


@pytest.fixture(params=["postgresql", "sqlite"])
def shared_config(request: pytest.FixtureRequest, tmp_path: Path) -> BillingConfig:
    """One database for both apps: PostgreSQL, or the data directory's SQLite files."""
    options = {"free_uses": 100}
    if request.param == "sqlite":
        return make_config(tmp_path, provider_options=options)
    return make_config(tmp_path, database_url=request.getfixturevalue("pg_url"), provider_options=options)


async def test_a_spend_on_one_app_reaches_the_others_cache(
    shared_config: BillingConfig, make_client: ClientFactory
) -> None:
    a, b = await two_apps(make_client, shared_config)
    headers = TokenFactory(shared_config).headers("alice")
    assert await used_seen_by(b, headers) == 0  # cached on B now
    for spent in range(1, 4):
        assert (await a.post(INTERACT, json={}, headers=headers)).status == 200
        await eventually(lambda spent=spent: shows(b, headers, spent))  # type: ignore[misc]
    assert (await b.post(INTERACT, json={"fail": True}, headers=headers)).status == 502
    await eventually(lambda: shows(a, headers, 3))


async def test_invalidate_on_one_app_reaches_the_others_cache(
    shared_config: BillingConfig, make_client: ClientFactory
) -> None:
    a, b = await two_apps(make_client, shared_config)
    headers = TokenFactory(shared_config).headers("alice")
    assert await used_seen_by(b, headers) == 0  # cached on B now
    provider = service(a).provider
    assert isinstance(provider, SimpleProvider)
    # Changes no app made (an operator's in the ledger), announced through A.
    alice = Account("local", "alice")
    await provider.ledger.spend(alice, "operator-1")
    assert await used_seen_by(b, headers) == 0
    service(a).invalidate(Identity("alice", "local", "OBSERVER"))
    await eventually(lambda: shows(b, headers, 1))
    await provider.ledger.spend(alice, "operator-2")
    service(a).invalidate()
    await eventually(lambda: shows(b, headers, 2))


async def test_a_logout_on_one_app_is_refused_by_the_other_and_by_one_started_later(
    shared_config: BillingConfig, make_client: ClientFactory
) -> None:
    a, b = await two_apps(make_client, shared_config)
    token = await login(a)
    assert (await b.get(CREDITS, headers=bearer(token))).status == 200  # verified and cached on B
    logout = await a.post(LOGOUT, headers=bearer(token))
    assert logout.status == 200

    async def refused_by_b() -> bool:
        return (await b.get(CREDITS, headers=bearer(token))).status == 401

    await eventually(refused_by_b)
    assert (await b.post(INTERACT, json={}, headers=bearer(token))).status == 401
    later = await make_client(shared_config, host=agent_routes)
    reply = await later.get(CREDITS, headers=bearer(token))
    assert (reply.status, await reply.json()) == (401, {"detail": "Invalid token"})
    other = await login(b)
    assert (await later.get(CREDITS, headers=bearer(other))).status == 200


async def test_revocations_are_stored_as_digests_and_pruned_after_expiry(
    pg_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(tmp_path, database_url=pg_url, jwt={"secret": SECRET, "leeway_seconds": 0})
    a = await make_client(config)
    tokens = TokenFactory(config)
    short, long = tokens.token("ann", ttl=2), tokens.token("ann", ttl=600)
    await service(a).revoke_everywhere(short)
    await service(a).revoke_everywhere(long)
    rows = await fetch(pg_url, "SELECT digest FROM revoked_tokens")
    assert len(rows) == 2
    assert not [d for (d,) in rows if short.encode() in bytes(d) or long.encode() in bytes(d)]
    await asyncio.sleep(2.1)  # the short token expires
    await service(a).revoke_everywhere(tokens.token("bob", ttl=600))  # a revocation prunes
    assert len(await fetch(pg_url, "SELECT digest FROM revoked_tokens")) == 2


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[TcpProxy]:
    target = URL(pg_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.cut()


async def test_while_the_feed_is_cut_nothing_cached_is_older_than_5_s_and_it_recovers(
    pg_url: str, proxy: TcpProxy, make_client: ClientFactory, tmp_path: Path
) -> None:
    """B's feed goes through the proxy, its ledger does not: the cut silences only the feed."""
    options = {"free_uses": 100}
    a_config = make_config(tmp_path / "a", database_url=pg_url, provider_options=options)
    b_config = make_config(tmp_path / "b", database_url=proxy.url_for(pg_url), provider_options=options)
    b_ledger = SimpleProvider.from_context(
        ProviderContext(options, data_dir=tmp_path, database_url=pg_url, provider="simple")
    )
    a = await make_client(a_config, host=agent_routes)
    b = await make_client(b_config, provider=b_ledger)
    feed = service(b).feed
    assert isinstance(feed, PostgresChangeFeed)
    headers = TokenFactory(a_config).headers("alice")
    assert await used_seen_by(b, headers) == 0

    await proxy.cut()
    await eventually(lambda: _listening(feed, False))
    assert (await a.post(INTERACT, json={}, headers=headers)).status == 200
    # Unheard, yet seen within 5 s of the outage's start (plus the second it takes to notice).
    await eventually(lambda: shows(b, headers, 1), within=7.0)
    assert (await a.post(INTERACT, json={}, headers=headers)).status == 200
    await eventually(lambda: shows(b, headers, 2), within=7.0)

    await proxy.restore()
    await eventually(lambda: _listening(feed, True))
    assert await used_seen_by(b, headers) == 2
    assert (await a.post(INTERACT, json={}, headers=headers)).status == 200
    await eventually(lambda: shows(b, headers, 3), within=3.0)


async def _listening(feed: PostgresChangeFeed, expected: bool) -> bool:
    return feed.listening is expected


async def test_a_logout_while_the_database_is_unreachable_is_503_and_refused_here(
    pg_url: str, proxy: TcpProxy, make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(tmp_path, database_url=proxy.url_for(pg_url))
    client = await make_client(config, authenticate=authenticate)
    token = await login(client)
    await proxy.cut()
    reply = await client.post(LOGOUT, headers=bearer(token))
    assert (reply.status, await reply.json()) == (503, {"detail": "Billing service unavailable"})
    assert (await client.get(CREDITS, headers=bearer(token))).status == 401


async def test_a_purchase_settled_through_one_app_reaches_the_others_cache(
    pg_url: str,
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
) -> None:
    config = BillingConfig.model_validate(ciris_billing_config.model_dump() | {"database_url": pg_url})
    a, b = await make_client(config), await make_client(config)
    ann = TokenFactory(config).headers("ann", email="ann@example.com")
    before = await (await b.get(CREDITS, headers=ann)).json()  # cached on B now
    started = await a.post(INITIATE, json={}, headers=ann)
    payment_id = (await started.json())["payment_id"]
    ciris_fake_backend.confirm_payment(payment_id)
    status = await (await a.get(STATUS + payment_id, headers=ann)).json()
    assert status["status"] == "succeeded"

    async def paid_credit_on_b() -> bool:
        credits = await (await b.get(CREDITS, headers=ann)).json()
        return bool(credits["credits_remaining"] > before["credits_remaining"])

    await eventually(paid_credit_on_b)


async def test_a_store_purchase_verified_through_one_app_reaches_the_others_cache(
    pg_url: str,
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
) -> None:
    config = BillingConfig.model_validate(ciris_billing_config.model_dump() | {"database_url": pg_url})
    a, b = await make_client(config), await make_client(config)
    bo = TokenFactory(config).headers("bo")
    assert (await (await b.get(CREDITS, headers=bo)).json())["credits_remaining"] == 0  # cached on B now
    purchase = {"purchase_token": "gp-freshness-1", "product_id": "credits_100", "package_name": "ai.ciris"}
    verified = await (await a.post(GOOGLE_PLAY, json=purchase, headers=bo)).json()
    assert verified["credits_added"] == 99

    async def credited_on_b() -> bool:
        return bool((await (await b.get(CREDITS, headers=bo)).json())["credits_remaining"] == 99)

    await eventually(credited_on_b)


class Heard:
    """A change feed's listener that keeps the users whose credit changed elsewhere."""

    def __init__(self, heard: list[tuple[str, str]]) -> None:
        self.heard = heard

    def identity_changed(self, key: tuple[str, str]) -> None:
        self.heard.append(key)

    def all_changed(self) -> None: ...
    def token_revoked(self, digest: bytes, until: float) -> None: ...
    def epoch_moved(self, key: tuple[str, str], epoch: float) -> None: ...
    def feed_down(self) -> None: ...
    def feed_up(self) -> None: ...


async def test_a_change_published_while_another_process_holds_the_feeds_file_is_sent_after(
    tmp_path: Path,
) -> None:
    # A publish is made on the loop when the file's write lock is free at once; when another
    # process holds it, the publisher task sends the change once it can.
    heard: list[tuple[str, str]] = []

    path = tmp_path / "changes.sqlite3"
    here, there = SQLiteChangeFeed(path), SQLiteChangeFeed(path)
    await here.start(Heard(heard))
    await there.start(Heard(heard))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        here.changed(("local", "ann"))
        await asyncio.sleep(0.2)
        assert heard == []
        other.execute("COMMIT")
        await eventually(lambda: _now(heard == [("local", "ann")]))
    finally:
        other.close()
        await here.stop()
        await there.stop()


async def test_a_change_the_loop_could_not_publish_for_an_error_is_sent_by_the_publisher_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heard: list[tuple[str, str]] = []

    def broken(payloads: list[str]) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    path = tmp_path / "changes.sqlite3"
    here, there = SQLiteChangeFeed(path), SQLiteChangeFeed(path)
    await here.start(Heard(heard))
    await there.start(Heard(heard))
    monkeypatch.setattr(here, "_publish_now", broken)
    try:
        here.changed(("local", "ann"))
        await eventually(lambda: _now(heard == [("local", "ann")]))
    finally:
        await here.stop()
        await there.stop()


async def _now(value: bool) -> bool:
    return value
