"""Paid credits under concurrent, failing and slow interactions of one user (`ciris` provider).

A failed interaction is refunded exactly when its charge took a paid credit. The fake backend records
which pool each charge really took (`LedgerEntry.pool`), which is the truth these tests hold the
proxy's bookkeeping against: over many interleavings, no paid credit is lost and none is minted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, credit_gate
from ciris_billing_proxy.keys import SERVICE_KEY, SPEND_KEY
from ciris_billing_proxy.ops.outbox import GIVE_BACKS_FILE
from ciris_billing_proxy.store import SQLiteDatabase
from ciris_billing_proxy.store.give_backs import Owed, give_back_store
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import INTERACT, paid_user, until, who, with_options
from .conftest import ClientFactory
from .default_paths import CREDITS


def keyed_agent(app: web.Application) -> None:
    """The agent's gated endpoint; it says under which request key it was charged, and fails on
    `?fail=1` after the gate took the use."""

    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        await asyncio.sleep(0)
        reply = {"key": request[SPEND_KEY]}
        return web.json_response(reply, status=502 if request.query.get("fail") else 200)

    app.router.add_post(INTERACT, interact)


def charges_by_key(fake: FakeBillingBackend, name: str) -> dict[str, str]:
    """Request key -> the pool its charge really took, from the fake's own ledger."""
    with fake.ledger.lock:
        return {
            t.metadata["request_id"]: t.pool
            for t in fake.ledger.transactions
            if t.account_key == who(name) and t.type == "charge" and t.metadata and t.pool
        }


def refunds(fake: FakeBillingBackend, name: str) -> int:
    with fake.ledger.lock:
        return sum(
            t.amount_minor
            for t in fake.ledger.transactions
            if t.account_key == who(name) and t.transaction_type == "refund"
        )


async def settled(client: Any) -> None:
    """Wait until no give-back is running or owed in the background."""
    service = client.app[SERVICE_KEY]
    await until(lambda: not service._money_tasks and not len(service.retries), seconds=30)


@pytest.fixture
async def keyed_client(ciris_billing_config: BillingConfig, make_client: ClientFactory) -> Any:
    return await make_client(ciris_billing_config, host=keyed_agent)


async def test_200_concurrent_failing_interactions_keep_every_paid_credit(
    keyed_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    fake = ciris_fake_backend
    auth = await paid_user(keyed_client, fake, ciris_tokens, "payer", 20)
    for _ in range(3):
        replies = await asyncio.gather(
            *(keyed_client.post(INTERACT + "?fail=1", json={}, headers=auth) for _ in range(200))
        )
        assert {r.status for r in replies} <= {502, 402}
        assert sum(r.status == 502 for r in replies) >= 20  # at least every paid credit was used
        await settled(keyed_client)
        assert fake.account(*who("payer"))["credits_remaining"] == 20
    pools = charges_by_key(fake, "payer")
    assert refunds(fake, "payer") == sum(pool == "paid" for pool in pools.values())
    status = await (await keyed_client.get(CREDITS, headers=auth)).json()
    assert status["credits_remaining"] == 20


async def test_interleaved_successes_and_failures_spend_exactly_the_successes_on_paid(
    keyed_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    fake = ciris_fake_backend
    auth = await paid_user(keyed_client, fake, ciris_tokens, "mixed", 100)
    with fake.ledger.lock:
        fake.ledger.accounts[who("mixed")].free_uses_remaining = 5  # free and paid uses interleave
    outcomes: dict[str, int] = {}
    for round_ in range(3):
        paths = [INTERACT + ("?fail=1" if (i + round_) % 3 else "") for i in range(150)]
        replies = await asyncio.gather(*(keyed_client.post(path, json={}, headers=auth) for path in paths))
        for reply in replies:
            if reply.status in (200, 502):
                outcomes[(await reply.json())["key"]] = reply.status
        await settled(keyed_client)
    pools = charges_by_key(fake, "mixed")
    assert set(outcomes) == set(pools)  # every charged request answered, and only those
    paid_successes = sum(pools[k] == "paid" and s == 200 for k, s in outcomes.items())
    paid_failures = sum(pools[k] == "paid" and s == 502 for k, s in outcomes.items())
    assert paid_successes > 0
    assert paid_failures > 0
    assert refunds(fake, "mixed") == paid_failures
    assert fake.account(*who("mixed"))["credits_remaining"] == 100 - paid_successes


@pytest.mark.parametrize("fault", ["latency", "latency_after"])
async def test_charges_that_time_out_one_after_another_are_refunded_exactly(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    fault: str,
) -> None:
    """Each charge's reply is lost to a timeout (it lands late, or commits and answers late), so
    each refund is decided in the background while the next request is being checked and charged."""
    fake = ciris_fake_backend
    config = with_options(
        ciris_billing_config,
        timeout_seconds=0.3,
        connect_timeout_seconds=0.2,
        max_retries=0,
        reconcile_window_seconds=5.0,
    )
    client = await make_client(config, host=keyed_agent)
    auth = await paid_user(client, fake, ciris_tokens, "slow", 10)
    # A check that answers a little late: the previous request's refund lands between it and the charge.
    fake.inject("latency_after", endpoint="credits/check", seconds=0.1)
    for _ in range(4):
        fake.inject(fault, endpoint="charges", seconds=0.45, times=3)
        statuses = [(await client.post(INTERACT, json={}, headers=auth, timeout=5)).status for _ in range(3)]
        assert statuses == [503, 503, 503]
        await settled(client)
        assert fake.account(*who("slow"))["credits_remaining"] == 10
    assert refunds(fake, "slow") == 12


async def test_a_mix_of_slow_failing_and_successful_interactions_under_backend_faults(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    fake = ciris_fake_backend
    config = with_options(
        ciris_billing_config,
        timeout_seconds=0.4,
        connect_timeout_seconds=0.2,
        max_retries=1,
        reconcile_window_seconds=5.0,
    )
    client = await make_client(config, host=keyed_agent)
    auth = await paid_user(client, fake, ciris_tokens, "chaos", 60)
    fake.inject("latency_after", endpoint="charges", seconds=0.5, times=10)  # committed, reply lost
    fake.inject("latency", endpoint="charges", seconds=0.5, times=10)  # lands after the timeout
    fake.inject("error_500", endpoint="credits", times=15)  # refunds fail for a while
    fake.inject("error_502", endpoint="transactions", times=15)
    paths = [INTERACT + ("?fail=1" if i % 2 else "") for i in range(80)]
    replies = await asyncio.gather(*(client.post(path, json={}, headers=auth, timeout=10) for path in paths))
    succeeded = {(await r.json())["key"] for r in replies if r.status == 200}
    await settled(client)
    pools = charges_by_key(fake, "chaos")
    paid_kept = sum(pool == "paid" for key, pool in pools.items() if key in succeeded)
    assert fake.account(*who("chaos"))["credits_remaining"] == 60 - paid_kept
    paid_charges = sum(pool == "paid" for pool in pools.values())
    assert refunds(fake, "chaos") == paid_charges - paid_kept  # every other paid charge came back


async def test_a_refund_owed_while_the_backend_is_down_is_made_once_it_is_back(
    keyed_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = ciris_fake_backend
    auth = await paid_user(keyed_client, fake, ciris_tokens, "outage", 5)
    fake.inject("error_500", endpoint="transactions")
    fake.inject("error_500", endpoint="credits")
    with caplog.at_level(logging.INFO, logger="ciris_billing_proxy"):
        reply = await keyed_client.post(INTERACT + "?fail=1", json={}, headers=auth)
        key = (await reply.json())["key"]
        await asyncio.sleep(1.0)  # several retries fail meanwhile
        assert fake.account(*who("outage"))["credits_remaining"] == 4
        assert fake.calls["transactions"] + fake.calls["credits"] > 2  # tried again, not dropped
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(key in message for message in warnings)  # the operator can name the request
        fake.clear_faults()
        await settled(keyed_client)
    assert fake.account(*who("outage"))["credits_remaining"] == 5
    status = await (await keyed_client.get(CREDITS, headers=auth)).json()
    assert status["credits_remaining"] == 5  # and the cache shows it


async def test_two_agents_on_one_backend_refund_exactly(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    tmp_path: Any,
) -> None:
    """Two processes of one agent (two apps, each its own state) serving one user at once: each
    refund is decided from the backend's listing, which both share, so neither confuses the other."""
    fake = ciris_fake_backend
    first = await make_client(ciris_billing_config, host=keyed_agent)
    other_dir = ciris_billing_config.model_copy(update={"data_dir": tmp_path / "second"})
    second = await make_client(other_dir, host=keyed_agent)
    auth = await paid_user(first, fake, ciris_tokens, "twice", 30)
    succeeded: set[str] = set()
    for _ in range(2):
        replies = await asyncio.gather(
            *(
                (first if i % 2 else second).post(
                    INTERACT + ("?fail=1" if i % 3 else ""), json={}, headers=auth
                )
                for i in range(120)
            )
        )
        succeeded |= {(await r.json())["key"] for r in replies if r.status == 200}
        await settled(first)
        await settled(second)
    pools = charges_by_key(fake, "twice")
    paid_kept = sum(pools[key] == "paid" for key in succeeded)
    assert fake.account(*who("twice"))["credits_remaining"] == 30 - paid_kept


async def test_a_paid_give_back_owed_at_shutdown_is_made_by_the_next_process(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The refund is owed in the outbox at shutdown; the next app on the same data directory, which
    never saw the charge, finds it in the listing by its request key and refunds it, once."""
    fake = ciris_fake_backend
    first = await make_client(ciris_billing_config, host=keyed_agent)
    auth = await paid_user(first, fake, ciris_tokens, "leaving", 3)
    fake.inject("error_500", endpoint="transactions")
    reply = await first.post(INTERACT + "?fail=1", json={}, headers=auth)
    key = (await reply.json())["key"]
    assert len(first.app[SERVICE_KEY].retries) == 1
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(first.close(), 10)
    assert any("still owed: kept in the give-back outbox" in r.getMessage() for r in caplog.records)
    assert fake.account(*who("leaving"))["credits_remaining"] == 2
    assert [owed.request_key for owed in await owed_in(ciris_billing_config)] == [key]

    fake.clear_faults()
    second = await make_client(ciris_billing_config, host=keyed_agent)
    await until(lambda: fake.account(*who("leaving"))["credits_remaining"] == 3, seconds=10)
    await settled(second)
    assert fake.account(*who("leaving"))["credits_remaining"] == 3
    assert refunds(fake, "leaving") == 1
    assert await owed_in(ciris_billing_config) == []


async def owed_in(config: BillingConfig) -> list[Owed]:
    """The give-backs kept in the outbox of `config`'s data directory, read by another engine."""
    store = give_back_store(SQLiteDatabase(config.data_dir / GIVE_BACKS_FILE))
    await store.open()
    try:
        return await store.all()
    finally:
        await store.close()


def host_with_deadline(app: web.Application) -> None:
    """A host whose own middleware gives every request 0.5 s, cancelling the handler after that."""

    @web.middleware
    async def deadline(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            async with asyncio.timeout(0.5):
                return await handler(request)  # type: ignore[no-any-return]
        except TimeoutError:
            return web.json_response({"detail": "timeout"}, status=504)

    app.middlewares.append(deadline)
    keyed_agent(app)


async def test_a_caller_cancelled_during_its_give_back_still_gets_the_use_back(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = ciris_fake_backend
    client = await make_client(ciris_billing_config, host=host_with_deadline)
    auth = await paid_user(client, fake, ciris_tokens, "hasty", 5)
    fake.inject("latency", endpoint="transactions", seconds=1.0, times=1)  # outlives the host's deadline
    fake.inject("error_500", endpoint="transactions")  # then the backend is down for a while
    with caplog.at_level(logging.WARNING):
        assert (await client.post(INTERACT + "?fail=1", json={}, headers=auth)).status == 504
        await until(lambda: len(client.app[SERVICE_KEY].retries) == 1, seconds=5)
        fake.clear_faults()
        await settled(client)
    (key,) = charges_by_key(fake, "hasty")
    assert any(key in r.getMessage() for r in caplog.records)
    assert fake.account(*who("hasty"))["credits_remaining"] == 5


async def test_a_give_back_failing_during_shutdown_is_kept_and_not_retried_after_it(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = ciris_fake_backend
    config = with_options(
        ciris_billing_config, timeout_seconds=0.3, connect_timeout_seconds=0.2, max_retries=0
    )
    client = await make_client(config, host=keyed_agent)
    service = client.app[SERVICE_KEY]
    auth = await paid_user(client, fake, ciris_tokens, "bye", 5)
    fake.inject("latency_after", endpoint="charges", seconds=0.5, times=1)  # committed, reply lost
    fake.inject("latency", endpoint="transactions", seconds=0.25, times=1)  # its give-back is slow...
    fake.inject("error_500", endpoint="transactions")  # ...and fails while shutdown drains it
    with caplog.at_level(logging.DEBUG):
        assert (await client.post(INTERACT, json={}, headers=auth)).status == 503
        await asyncio.wait_for(client.close(), 10)
        assert not len(service.retries)
        attempts = fake.calls["transactions"]
        await asyncio.sleep(0.5)
    assert fake.calls["transactions"] == attempts  # nothing runs after shutdown
    (key,) = charges_by_key(fake, "bye")
    assert [owed.request_key for owed in await owed_in(config)] == [key]  # for the next process


async def test_a_backend_that_refuses_the_listing_ends_the_give_back_with_one_warning(
    keyed_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend from before the listing existed answers 404: no refund can be proven safe, and
    asking again will not change that, so it is not retried (nor does it flood the log)."""
    fake = ciris_fake_backend
    auth = await paid_user(keyed_client, fake, ciris_tokens, "old", 5)
    fake.inject("not_found", endpoint="transactions")
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            await keyed_client.post(INTERACT + "?fail=1", json={}, headers=auth)
        assert not len(keyed_client.app[SERVICE_KEY].retries)
        calls = fake.calls["transactions"]
        await asyncio.sleep(0.5)
    assert fake.calls["transactions"] == calls == 5
    keys = charges_by_key(fake, "old")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(any(key in w for w in warnings) for key in keys)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 5
    assert refunds(fake, "old") == 0


async def test_a_timed_out_charge_that_took_a_free_use_is_not_refunded(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    fake = ciris_fake_backend
    config = with_options(
        ciris_billing_config, timeout_seconds=0.3, connect_timeout_seconds=0.2, max_retries=0
    )
    client = await make_client(config, host=keyed_agent)
    auth = ciris_tokens.headers("freebie")
    await client.get(CREDITS, headers=auth)
    fake.grant(*who("freebie"), 5)  # paid credits exist, but free uses go first
    for fault in ("latency", "latency_after"):
        fake.inject(fault, endpoint="charges", seconds=0.45, times=1)
        assert (await client.post(INTERACT, json={}, headers=auth, timeout=5)).status == 503
        await settled(client)
    assert set(charges_by_key(fake, "freebie").values()) == {"daily"}
    assert refunds(fake, "freebie") == 0
    assert fake.account(*who("freebie"))["credits_remaining"] == 5


async def test_a_paid_balance_change_missing_from_the_listing_cannot_mint_a_refund(
    keyed_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    """The backend's tool charges take main-pool credits without a listed entry: the listing then
    shows a free use's charge one below its predecessor. One-time free uses left prove it free."""
    fake = ciris_fake_backend
    auth = ciris_tokens.headers("tools")
    await keyed_client.get(CREDITS, headers=auth)
    fake.grant(*who("tools"), 5)
    with fake.ledger.lock:
        fake.ledger.accounts[who("tools")].paid_credits -= 1  # a tool charge: no listed entry
    assert (await keyed_client.post(INTERACT + "?fail=1", json={}, headers=auth)).status == 502
    await settled(keyed_client)
    assert refunds(fake, "tools") == 0
    assert fake.account(*who("tools"))["credits_remaining"] == 4
