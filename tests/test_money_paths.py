"""Money paths under cancellation, late failures and storage faults: nothing is lost or kept wrongly."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, Identity, ProviderUnavailable, credit_gate, setup_billing
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.ledger import Account, ledger_for
from ciris_billing_proxy.store import SQLiteDatabase
from ciris_billing_proxy.testing import TokenFactory

from .conftest import make_config
from .default_paths import CREDITS, LOGIN
from .providers import ShopProvider

ALICE = Identity("user-1", "local", "OBSERVER")


def gated_app(config: BillingConfig, provider: ShopProvider) -> web.Application:
    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("work", "0")))
        return web.json_response({"ok": True})

    app = web.Application()
    setup_billing(app, config, provider=provider, environ={})
    app.router.add_post("/v1/agent/interact", interact)
    return app


@pytest.mark.parametrize("where", ["during the spend", "during the handler"])
async def test_a_client_that_goes_away_gets_its_use_back(
    aiohttp_client: Any, config: BillingConfig, tokens: TokenFactory, where: str
) -> None:
    provider = ShopProvider(credits=5)
    client = await aiohttp_client(gated_app(config, provider), server_kwargs={"handler_cancellation": True})
    if where == "during the spend":
        provider.delay = 0.3
    path = "/v1/agent/interact?work=" + ("0" if where == "during the spend" else "1")
    with pytest.raises(asyncio.TimeoutError):
        await client.post(path, headers=tokens.headers(), timeout=0.1)
    service = client.app[SERVICE_KEY]
    for _ in range(100):  # the spend finishes, then the give-back, both in the background
        await asyncio.sleep(0.02)
        if provider.calls.get("give_back") and not service._money_tasks:
            break
    provider.delay = 0
    assert provider.balance(ALICE) == 5
    status = await (await client.get(CREDITS, headers=tokens.headers())).json()
    assert status["credits_remaining"] == 5  # and the cache did not keep a stale value


async def test_a_spend_that_landed_before_failing_is_reconciled(
    aiohttp_client: Any, config: BillingConfig, tokens: TokenFactory
) -> None:
    class LateFailure(ShopProvider):
        async def spend(self, identity: Identity, idempotency_key: str) -> None:
            await super().spend(identity, idempotency_key)
            raise ProviderUnavailable("timed out after the backend committed")

    provider = LateFailure(credits=5)
    client = await aiohttp_client(gated_app(config, provider))
    resp = await client.post("/v1/agent/interact", headers=tokens.headers())
    assert resp.status == 503
    await asyncio.sleep(0.05)
    assert provider.balance(ALICE) == 5


async def test_shutdown_waits_for_give_backs_started_late(config: BillingConfig) -> None:
    provider = ShopProvider(credits=5)
    provider.delay = 0.05
    app = web.Application()
    service = setup_billing(app, config, provider=provider, environ={})
    lifespan = service.lifespan(app)
    await lifespan.__anext__()
    spend = asyncio.ensure_future(service.spend(ALICE, "k"))
    await asyncio.sleep(0.01)
    spend.cancel()
    with pytest.raises(asyncio.CancelledError):
        await spend
    with pytest.raises(StopAsyncIteration):
        await lifespan.__anext__()
    assert provider.calls.get("give_back") == 1
    assert provider.balance(ALICE) == 5


async def test_shutdown_waits_for_a_spend_that_had_to_wait(config: BillingConfig) -> None:
    # A spend that finishes without waiting runs on the caller's stack (`eager`); one that waits
    # (here the provider's delay) goes on in a tracked task, which shutdown waits for.
    class EagerShop(ShopProvider):
        @property
        def eager_spends(self) -> bool:
            return True

    provider = EagerShop(credits=5)
    provider.delay = 0.05
    app = web.Application()
    service = setup_billing(app, config, provider=provider, environ={})
    lifespan = service.lifespan(app)
    await lifespan.__anext__()
    spend = asyncio.ensure_future(service.spend(ALICE, "k"))
    await asyncio.sleep(0.01)
    with pytest.raises(StopAsyncIteration):
        await lifespan.__anext__()
    assert spend.done()
    assert provider.balance(ALICE) == 4


async def test_a_failed_commit_does_not_wedge_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    db = SQLiteDatabase(path)
    ledger = ledger_for(db, signup=lambda _: 10)
    u = Account("local", "u")
    await ledger.open()
    try:
        # Rollback-journal mode (what a filesystem without WAL gives): a reader's shared lock makes
        # COMMIT itself fail, after BEGIN IMMEDIATE and the UPDATE went through.
        await db.run(lambda conn: conn.execute("PRAGMA journal_mode = DELETE"))
        await db.run(lambda conn: conn.execute("PRAGMA busy_timeout = 50"))
        await ledger.spend(u, "k1")
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM credit_accounts").fetchall()
        # A locked file is an outage (503), not a provider bug.
        with pytest.raises(ProviderUnavailable, match="database unavailable"):
            await ledger.spend(u, "k2")
        reader.execute("ROLLBACK")
        reader.close()
        assert await ledger.spend(u, "k3")
        assert (await ledger.balance(u)).used == 2
    finally:
        await ledger.close()


async def test_deeply_nested_json_is_a_400(aiohttp_client: Any, config: BillingConfig) -> None:
    from ciris_billing_proxy.tools.users import UserStore

    app = web.Application()
    setup_billing(app, config, authenticate=UserStore().verify_login, environ={})
    client = await aiohttp_client(app)
    resp = await client.post(LOGIN, data=b"[" * 100_00, headers={"Content-Type": "application/json"})
    assert resp.status in (400, 413)
    assert "detail" in await resp.json()
    resp = await client.post(LOGIN, data=b"[" * 5000)
    assert (resp.status, await resp.json()) == (400, {"detail": "Malformed JSON body"})


async def test_bypass_roles_are_case_insensitive(
    tmp_path: Path, tokens: TokenFactory, aiohttp_client: Any
) -> None:
    config = make_config(tmp_path, gate_bypass_roles=frozenset({"admin"}))
    assert config.gate_bypass_roles == {"ADMIN"}
    provider = ShopProvider(credits=0)
    client = await aiohttp_client(gated_app(config, provider))
    resp = await client.post("/v1/agent/interact", headers=tokens.headers(role="Admin"))
    assert resp.status == 200


@pytest.mark.parametrize("maybe_applied", [True, False])
async def test_a_cancelled_caller_whose_spend_fails_ambiguously_is_reconciled(
    config: BillingConfig, maybe_applied: bool
) -> None:
    class LandsThenTimesOut(ShopProvider):
        async def spend(self, identity: Identity, idempotency_key: str) -> None:
            await asyncio.sleep(0.05)
            await super().spend(identity, idempotency_key)
            raise ProviderUnavailable("timed out after the backend committed", maybe_applied=maybe_applied)

    provider = LandsThenTimesOut(credits=5)
    app = web.Application()
    service = setup_billing(app, config, provider=provider, environ={})
    lifespan = service.lifespan(app)
    await lifespan.__anext__()
    spend = asyncio.ensure_future(service.spend(ALICE, "k"))
    await asyncio.sleep(0.01)
    spend.cancel()
    with pytest.raises(asyncio.CancelledError):
        await spend
    with pytest.raises(StopAsyncIteration):
        await lifespan.__anext__()  # shutdown drains the background settling
    assert provider.calls.get("give_back", 0) == (1 if maybe_applied else 0)
    assert provider.balance(ALICE) == (5 if maybe_applied else 4)
