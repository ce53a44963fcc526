"""Two app instances on one PostgreSQL database behave as one agent for spends, give-backs and
payments (each test gets a database of its own; see tests/postgres.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciris_billing_proxy import BillingConfig, ProviderContext
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.ledger import Account, ledger_for
from ciris_billing_proxy.providers.ciris import CirisProvider
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store import PostgresDatabase
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory
from ciris_billing_proxy.testing.conformance import ProviderContract

from . import test_conformance
from .ciris_helpers import INTERACT, agent_routes
from .conftest import ClientFactory, make_config
from .default_paths import CREDITS, INITIATE, STATUS
from .postgres import fetch

Client = TestClient[web.Request, web.Application]


async def _two_apps(make_client: ClientFactory, config: BillingConfig) -> tuple[Client, Client]:
    return await make_client(config, host=agent_routes), await make_client(config, host=agent_routes)


def _config(tmp_path: Path, pg_url: str, free_uses: int) -> BillingConfig:
    return make_config(tmp_path, database_url=pg_url, provider_options={"free_uses": free_uses})


async def test_two_apps_never_grant_more_than_the_free_uses(
    pg_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    config = _config(tmp_path, pg_url, free_uses=50)
    a, b = await _two_apps(make_client, config)
    headers = TokenFactory(config).headers("alice")
    results = await asyncio.gather(
        *((a if i % 2 else b).post(INTERACT, json={}, headers=headers) for i in range(200))
    )
    statuses = [r.status for r in results]
    assert statuses.count(200) == 50
    assert statuses.count(402) == 150
    assert await fetch(pg_url, "SELECT used FROM credit_accounts") == [(50,)]
    assert await fetch(pg_url, "SELECT count(*) FROM credit_entries WHERE state = 'spent'") == [(50,)]
    for app in (a, b):
        credits = await (await app.get(CREDITS, headers=headers)).json()
        assert (credits["free_uses_remaining"], credits["total_uses"]) == (0, 50)


async def test_failed_interactions_on_either_app_give_back_exactly_their_use(
    pg_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    config = _config(tmp_path, pg_url, free_uses=100)
    a, b = await _two_apps(make_client, config)
    headers = TokenFactory(config).headers("alice")
    results = await asyncio.gather(
        *((a if i % 2 else b).post(INTERACT, json={"fail": i % 3 == 0}, headers=headers) for i in range(60))
    )
    assert sorted({r.status for r in results}) == [200, 502]
    assert await fetch(pg_url, "SELECT used FROM credit_accounts") == [(40,)]
    assert await fetch(pg_url, "SELECT kind, count(*) FROM credit_entries GROUP BY kind ORDER BY kind") == [
        ("give_back", 20),
        ("spend", 60),
    ]
    credits = await (await b.get(CREDITS, headers=headers)).json()
    assert credits["free_uses_remaining"] == 60


async def test_one_key_spent_or_given_back_on_two_ledgers_at_once_counts_once(pg_url: str) -> None:
    ledgers = [ledger_for(PostgresDatabase(parse_database_url(pg_url)), signup=lambda _: 5) for _ in range(2)]
    for ledger in ledgers:
        await ledger.open()
    u = Account("local", "u")
    try:
        spent = await asyncio.gather(*(ledgers[i % 2].spend(u, "k") for i in range(20)))
        assert all(spent)
        assert (await ledgers[0].balance(u)).used == 1
        await asyncio.gather(*(ledgers[i % 2].give_back(u, "k") for i in range(20)))
        await ledgers[1].give_back(u, "never-spent")
        assert (await ledgers[1].balance(u)).used == 0
        entries, total = await ledgers[0].entries(u, 10, 0)
        assert total == 2
        assert [entry.kind for entry in entries] == ["give_back", "spend"]
        assert await ledgers[0].spend(u, "k")  # spent before: not spent again
        assert (await ledgers[0].balance(u)).used == 0
    finally:
        for ledger in ledgers:
            await ledger.close()


async def test_a_payment_started_on_one_app_is_followed_on_the_other_by_its_owner_only(
    pg_url: str,
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
) -> None:
    config = BillingConfig.model_validate(ciris_billing_config.model_dump() | {"database_url": pg_url})
    a, b = await make_client(config), await make_client(config)
    tokens = TokenFactory(config)
    ann = tokens.headers("ann", email="ann@example.com")
    bob = tokens.headers("bob", email="bob@example.com")
    started = await a.post(INITIATE, json={}, headers=ann)
    assert started.status == 200
    payment_id = (await started.json())["payment_id"]
    assert (await b.get(STATUS + payment_id, headers=ann)).status == 200
    other = await b.get(STATUS + payment_id, headers=bob)
    assert other.status == 404
    assert (await other.json()) == {"detail": "Payment not found"}
    ciris_fake_backend.confirm_payment(payment_id)
    done = await (await b.get(STATUS + payment_id, headers=ann)).json()
    assert done["status"] == "succeeded"
    assert await fetch(pg_url, "SELECT user_id, balance_after FROM payments") == [
        ("ann", done["balance_after"])
    ]
    assert await fetch(pg_url, "SELECT count(*) FROM payments WHERE user_id = 'ann'") == [(1,)]


class TestSimpleConformsOnPostgres(ProviderContract):
    @pytest.fixture
    async def provider(self, pg_url: str, tmp_path: Path) -> AsyncIterator[SimpleProvider]:
        provider = SimpleProvider.from_context(ProviderContext(data_dir=tmp_path, database_url=pg_url))
        await provider.start()
        yield provider
        await provider.stop()


class TestCirisConformsOnPostgres(test_conformance.TestCirisConforms):
    """The same contract and hooks as on SQLite; only the provider's records move to PostgreSQL."""

    @pytest.fixture
    async def provider(
        self, ciris_billing_config: BillingConfig, ciris_fake_backend: FakeBillingBackend, pg_url: str
    ) -> AsyncIterator[CirisProvider]:
        self.fake, config = ciris_fake_backend, ciris_billing_config
        self.agent_id = config.agent_id
        context = ProviderContext(
            config.provider_options, data_dir=config.data_dir, agent_id=config.agent_id, database_url=pg_url
        )
        provider = CirisProvider.from_context(context)
        await provider.start()
        yield provider
        await provider.stop()
