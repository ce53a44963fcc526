"""The `simple` provider: configuration, persistence across restarts, atomic spends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciris_billing_proxy import ConfigError, CreditStatus, Identity, InsufficientCredit, setup_billing
from ciris_billing_proxy.providers import ProviderContext
from ciris_billing_proxy.providers.registry import create_provider
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store import SQLiteDatabase
from ciris_billing_proxy.testing import TokenFactory

from .conftest import make_config
from .default_paths import CREDITS

ALICE = Identity("alice", "local", "OBSERVER")


def test_free_uses_from_environment_and_options(tmp_path: Path) -> None:
    env = {"CIRIS_SIMPLE_FREE_USES": "3"}
    provider = SimpleProvider.from_context(ProviderContext(environ=env, data_dir=tmp_path))
    assert provider.settings.free_uses == 3
    engine = provider.ledger.engine
    assert isinstance(engine, SQLiteDatabase)
    assert engine.path == str(tmp_path / "simple-usage.sqlite3")
    provider = SimpleProvider.from_context(
        ProviderContext(options={"free_uses": 5}, environ=env, data_dir=tmp_path)
    )
    assert provider.settings.free_uses == 5


@pytest.mark.parametrize("bad", [{"free_uses": -1}, {"free_uses": "many"}, {"colour": "blue"}])
def test_bad_settings_fail_with_a_clear_message(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="simple provider"):
        create_provider("simple", ProviderContext(options=bad, data_dir=tmp_path))


async def test_spends_are_atomic_and_never_go_negative() -> None:
    provider = SimpleProvider(database=":memory:")
    await provider.start()
    try:
        results = await asyncio.gather(
            *(provider.spend(ALICE, f"k{i}") for i in range(25)), return_exceptions=True
        )
        spent = [r for r in results if isinstance(r, CreditStatus)]
        # Each spend tells the status its own transaction left: every count from 1 to 10 once.
        assert sorted(r.total_uses for r in spent) == list(range(1, 11))
        assert all(isinstance(r, InsufficientCredit) for r in results if not isinstance(r, CreditStatus))
        status = await provider.credit_status(ALICE)
        assert (status.free_uses_remaining, status.total_uses, status.has_credit) == (0, 10, False)
        # Give-backs are once per key, and only for keys that were spent.
        await asyncio.gather(*(provider.give_back(ALICE, "k0") for _ in range(5)))
        await provider.give_back(ALICE, "never-spent")
        assert (await provider.credit_status(ALICE)).free_uses_remaining == 1
        # A repeated spend key does not spend twice.
        await provider.spend(ALICE, "again")
        await provider.spend(ALICE, "again")
        assert (await provider.credit_status(ALICE)).free_uses_remaining == 0
    finally:
        await provider.stop()


async def test_usage_survives_an_app_restart_on_the_same_file(tmp_path: Path) -> None:
    config = make_config(tmp_path, provider_options={})
    headers = TokenFactory(config).headers("alice")

    async def run_once(spend: int) -> dict[str, object]:
        app = web.Application()
        service = setup_billing(app, config, environ={})
        async with TestClient(TestServer(app)) as client:
            for i in range(spend):
                await service.spend(ALICE, f"restart-{spend}-{i}")
            resp = await client.get(CREDITS, headers=headers)
            body: dict[str, object] = await resp.json()
            return body

    first = await run_once(spend=3)
    assert first["free_uses_remaining"] == 7
    second = await run_once(spend=0)
    assert second["free_uses_remaining"] == 7
    assert second["total_uses"] == 3
    assert (tmp_path / "simple-usage.sqlite3").stat().st_mode & 0o077 == 0


async def test_two_processes_sharing_a_file_never_overspend(tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    a, b = SimpleProvider(database=db), SimpleProvider(database=db)
    await a.start()
    await b.start()
    try:
        results = await asyncio.gather(
            *(p.spend(ALICE, f"{n}-{i}") for i in range(15) for n, p in (("a", a), ("b", b))),
            return_exceptions=True,
        )
        spent = [r.total_uses for r in results if isinstance(r, CreditStatus)]
        assert sorted(spent) == list(range(1, 11))  # across both ledgers, each count once
        assert (await a.credit_status(ALICE)).total_uses == 10
    finally:
        await a.stop()
        await b.stop()
