"""The `stripe` provider on PostgreSQL, two agents (each its own pools, as two processes have) sharing
one database and one Stripe account: a purchase settled at once by webhooks on one and status polls on
the other is credited once; a refund racing its own repeats on both claws back once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ciris_billing_proxy.testing.fake_stripe_api import FakeStripeAPI

from .conftest import ClientFactory
from .postgres import fetch
from .stripe_helpers import Agent, start_agent, stripe_config


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripeAPI]:
    api = FakeStripeAPI()
    await api.start()
    yield api
    await api.stop()


async def two_agents(
    make_client: ClientFactory, tmp_path: Path, fake: FakeStripeAPI, pg_url: str
) -> tuple[Agent, Agent]:
    agents = []
    for name in ("a", "b"):
        config = stripe_config(
            tmp_path / name, fake, database=None, config={"database_url": pg_url, "database_pool_size": 3}
        )
        agents.append(await start_agent(make_client, config, fake, webhooks=name == "a"))
    return agents[0], agents[1]


async def test_a_webhook_on_one_agent_and_polls_on_another_credit_once(
    make_client: ClientFactory, tmp_path: Path, fake: FakeStripeAPI, pg_url: str
) -> None:
    a, b = await two_agents(make_client, tmp_path, fake, pg_url)
    hooks = fake.webhooks
    hooks.hold()
    hooks.copies = 5
    started = await a.initiate()
    payment_id = started["payment_id"]
    fake.state.confirm(payment_id, "pm_card_visa")
    hooks.release("shuffle")  # five deliveries of each event to a, while b polls ten times at once
    polls = await asyncio.gather(*(b.status(payment_id) for _ in range(10)))
    await a.settled()
    assert polls == [{"status": "succeeded", "credits_added": 20, "balance_after": 20}] * 10
    assert {d.status for d in hooks.deliveries} == {200}
    for agent in (a, b):
        assert (await agent.credits())["credits_remaining"] == 20
        assert await agent.status(payment_id) == polls[0]
    grants = await fetch(pg_url, "SELECT amount FROM credit_grants WHERE user_id = 'ann'")
    assert grants == [(20,)]
    events = await fetch(pg_url, "SELECT kind FROM billing_events WHERE kind = 'purchase.succeeded'")
    assert len(events) == 1


async def test_a_refund_repeated_on_both_agents_claws_back_once(
    make_client: ClientFactory, tmp_path: Path, fake: FakeStripeAPI, pg_url: str
) -> None:
    a, b = await two_agents(make_client, tmp_path, fake, pg_url)
    started = await a.initiate()
    payment_id = started["payment_id"]
    fake.state.confirm(payment_id, "pm_card_visa")
    await a.settled()
    await a.spend(12)
    hooks = fake.webhooks
    hooks.hold()
    state = fake.state
    state.refund(state.charge_of(payment_id, None), 250)  # half: 10 uses
    state.refund(state.charge_of(payment_id, None))  # the rest: all 20
    held = [e for e in state.events if e.type == "charge.refunded"]
    hooks.release()
    hooks.url = b.webhook_url()
    for event in held * 3:
        hooks.resend(event)
    await a.settled()
    assert {d.status for d in hooks.deliveries} == {200}
    for agent in (a, b):
        credits = await agent.credits()
        assert (credits["credits_remaining"], credits["has_credit"]) == (0, False)
    assert await a.provider.records.owed("local", "ann") == 12
    clawed = await fetch(pg_url, "SELECT data FROM billing_events WHERE kind = 'credit.clawed_back'")
    assert sum(int(json.loads(str(data))["amount"]) for (data,) in clawed) == 8


async def test_a_webhook_credit_on_one_agent_reaches_the_others_cached_credit(
    make_client: ClientFactory, tmp_path: Path, fake: FakeStripeAPI, pg_url: str
) -> None:
    a, b = await two_agents(make_client, tmp_path, fake, pg_url)
    started = await b.initiate()
    assert (await b.credits())["credits_remaining"] == 0  # now in b's cache
    fake.state.confirm(started["payment_id"], "pm_card_visa")
    await a.settled()  # the webhook went to a
    # Well within the 5 s a cached "no credit" lives: the change feed dropped it.
    for _ in range(30):
        if (await b.credits())["credits_remaining"] == 20:
            break
        await asyncio.sleep(0.05)
    assert (await b.credits())["credits_remaining"] == 20
