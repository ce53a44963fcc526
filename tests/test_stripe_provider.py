"""The `stripe` provider against the fake Stripe API over real HTTP: packs, purchases credited once by
the signed webhook or by a status poll, failures and cancellations, refunds and disputes clawed back
(never below zero, the rest owed and taken from the next purchase), and webhooks repeated, reordered,
forged or stale."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ciris_billing_proxy import InsufficientCredit
from ciris_billing_proxy.testing.fake_stripe_api import FakeStripeAPI, signature

from .conftest import ClientFactory
from .stripe_helpers import PACKS, WEBHOOK, Agent, start_agent, stripe_config


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripeAPI]:
    api = FakeStripeAPI()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def agent(make_client: ClientFactory, tmp_path: Path, fake: FakeStripeAPI) -> Agent:
    return await start_agent(make_client, stripe_config(tmp_path, fake), fake)


async def paid(agent: Agent, user: str = "ann", **body: object) -> str:
    """A purchase started and paid with Stripe's test card; its id."""
    started = await agent.initiate(user, **body)
    agent.fake.state.confirm(started["payment_id"], "pm_card_visa")
    return str(started["payment_id"])


async def events_of(agent: Agent, kind: str) -> list[dict[str, object]]:
    engine = agent.provider.ledger.engine
    rows = await engine.run(  # type: ignore[attr-defined]
        lambda conn: conn.execute("SELECT data FROM billing_events WHERE kind = ?", (kind,)).fetchall()
    )
    return [json.loads(data) for (data,) in rows]


async def test_packs_are_offered_and_sold(agent: Agent) -> None:
    credits = await agent.credits()
    assert credits["has_credit"] is False
    assert credits["purchase_options"] == {"price_minor": 500, "uses": 20, "currency": "USD"}
    code, capabilities = await agent.get("/capabilities")
    assert code == 200
    assert capabilities["provider"] == "stripe"
    assert [p["id"] for p in capabilities["packs"]] == ["small", "big"]
    assert capabilities["packs"][1] == {"id": "big", "uses": 100, "price_minor": 2000, "currency": "USD"}

    small = await agent.initiate()
    assert (small["uses_purchased"], small["amount_minor"], small["currency"]) == (20, 500, "USD")
    assert small["publishable_key"] == agent.fake.publishable_key
    assert small["client_secret"].startswith(small["payment_id"] + "_secret_")
    big = await agent.initiate(pack="big")
    assert (big["uses_purchased"], big["amount_minor"]) == (100, 2000)
    assert big["payment_id"] != small["payment_id"]
    assert agent.fake.state.intents[big["payment_id"]].amount == 2000

    resp = await agent.client.post(
        "/v1/api/billing/purchase/initiate", headers=agent.headers(), json={"pack": "huge"}
    )
    assert resp.status == 400
    assert (await resp.json())["detail"] == "Unknown pack; choose one of: small, big"


async def test_free_uses_are_a_signup_grant(
    make_client: ClientFactory, tmp_path: Path, fake: FakeStripeAPI
) -> None:
    agent = await start_agent(make_client, stripe_config(tmp_path, fake, free_uses=3), fake)
    credits = await agent.credits()
    assert (credits["free_uses_remaining"], credits["credits_remaining"], credits["has_credit"]) == (
        3,
        0,
        True,
    )
    await agent.spend(3)
    credits = await agent.credits()
    assert credits["has_credit"] is False
    assert credits["purchase_options"]["uses"] == 20


async def test_a_paid_purchase_is_credited_by_the_webhook(agent: Agent) -> None:
    payment_id = await paid(agent)
    await agent.settled()
    assert {d.status for d in agent.fake.webhooks.deliveries} == {200}
    credits = await agent.credits()
    assert (credits["credits_remaining"], credits["has_credit"]) == (20, True)
    assert await agent.status(payment_id) == {"status": "succeeded", "credits_added": 20, "balance_after": 20}
    succeeded = await events_of(agent, "purchase.succeeded")
    assert [e["payment_id"] for e in succeeded] == [payment_id]
    # What every provider's purchase.succeeded has (docs/events.md), whichever provider sold it.
    assert {k: succeeded[0][k] for k in ("payment_id", "credits_added", "balance_after")} == {
        "payment_id": payment_id,
        "credits_added": 20,
        "balance_after": 20,
    }
    code, page = await agent.get("/transactions")
    assert code == 200
    assert page["transactions"][0]["type"] == "credit"
    assert page["transactions"][0]["amount_minor"] == 20


async def test_without_webhooks_the_status_poll_asks_stripe_and_credits(
    make_client: ClientFactory, tmp_path: Path, fake: FakeStripeAPI
) -> None:
    agent = await start_agent(
        make_client, stripe_config(tmp_path, fake, webhook_secret=None), fake, webhooks=False
    )
    started = await agent.initiate()
    assert (await agent.status(started["payment_id"]))["status"] == "requires_payment_method"
    fake.state.confirm(started["payment_id"], "pm_card_visa")
    for _ in range(3):
        assert await agent.status(started["payment_id"]) == {
            "status": "succeeded",
            "credits_added": 20,
            "balance_after": 20,
        }
    assert (await agent.credits())["credits_remaining"] == 20
    # And a webhook route without its secret refuses everything.
    resp = await agent.client.post(WEBHOOK, data=b"{}")
    assert resp.status == 400


async def test_the_same_event_five_times_credits_once(agent: Agent) -> None:
    agent.fake.webhooks.copies = 5
    payment_id = await paid(agent)
    await agent.settled()
    succeeded = [d for d in agent.fake.webhooks.deliveries if d.type == "payment_intent.succeeded"]
    assert [d.status for d in succeeded] == [200] * 5
    assert (await agent.credits())["credits_remaining"] == 20
    assert len(await events_of(agent, "purchase.succeeded")) == 1
    assert len(await agent.provider.ledger.grants(_account())) == 1
    assert (await agent.status(payment_id))["balance_after"] == 20


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
async def test_events_out_of_order_change_nothing_twice(agent: Agent, order: str) -> None:
    hooks = agent.fake.webhooks
    hooks.hold()
    hooks.copies = 2
    payment_id = await paid(agent)
    state = agent.fake.state
    charge = state.charges[state.intents[payment_id].latest_charge or ""]
    state.refund(charge, 100)  # a fifth of the price: 4 of the 20 uses
    state.refund(charge, 100)  # two fifths in all: 8
    hooks.release(order)
    await agent.settled()
    assert {d.status for d in hooks.deliveries} == {200}
    assert (await agent.credits())["credits_remaining"] == 12
    # Delivered again, all of them, in any order: nothing changes.
    for event in list(state.events):
        hooks.resend(event)
    await agent.settled()
    assert (await agent.credits())["credits_remaining"] == 12
    assert await agent.provider.records.owed("local", "ann") == 0


async def test_a_refund_after_uses_were_spent_claws_back_what_is_left_and_owes_the_rest(agent: Agent) -> None:
    payment_id = await paid(agent)
    await agent.settled()
    await agent.spend(15)
    assert (await agent.credits())["credits_remaining"] == 5
    agent.fake.state.refund(agent.fake.state.charge_of(payment_id, None))
    await agent.settled()
    credits = await agent.credits()
    assert (credits["credits_remaining"], credits["has_credit"]) == (0, False)
    assert await agent.provider.records.owed("local", "ann") == 15
    clawed = await events_of(agent, "credit.clawed_back")
    assert sum(int(str(e.get("amount", e.get("taken", 0)))) for e in clawed) == 5
    # The next purchase repays what is owed first.
    second = await paid(agent)
    await agent.settled()
    assert (await agent.credits())["credits_remaining"] == 5
    assert await agent.provider.records.owed("local", "ann") == 0
    assert await agent.status(second) == {"status": "succeeded", "credits_added": 20, "balance_after": 5}


async def test_a_dispute_claws_back_every_use(agent: Agent) -> None:
    started = await agent.initiate()
    agent.fake.state.confirm(started["payment_id"], "pm_card_createDispute")
    await agent.settled()
    assert (await agent.credits())["credits_remaining"] == 0
    await agent.spend(0)
    assert await agent.provider.records.owed("local", "ann") == 0


async def test_failures_and_cancellations_end_the_payment(agent: Agent) -> None:
    declined = await agent.initiate()
    with pytest.raises(Exception, match="declined"):
        agent.fake.state.confirm(declined["payment_id"], "pm_card_chargeDeclined")
    await agent.settled()
    assert (await agent.status(declined["payment_id"]))["status"] == "failed"
    # A failed payment is not handed back to the next click: a new one is made.
    again = await agent.initiate()
    assert again["payment_id"] != declined["payment_id"]
    agent.fake.state.cancel(again["payment_id"])
    await agent.settled()
    assert (await agent.status(again["payment_id"]))["status"] == "canceled"
    assert (await agent.credits())["credits_remaining"] == 0


async def test_replays_double_clicks_and_ownership(agent: Agent) -> None:
    keyed = {"Idempotency-Key": "k-1", **agent.headers()}
    first = await agent.client.post("/v1/api/billing/purchase/initiate", headers=keyed, json={})
    second = await agent.client.post("/v1/api/billing/purchase/initiate", headers=keyed, json={})
    assert (await first.json()) == (await second.json())
    click = await agent.initiate()
    assert click["payment_id"] == (await first.json())["payment_id"]  # within the double-click window
    other_pack = await agent.initiate(pack="big")
    assert other_pack["payment_id"] != click["payment_id"]
    code, body = await agent.get(f"/purchase/status/{click['payment_id']}", user="bob")
    assert (code, body) == (404, {"detail": "Payment not found"})
    assert len(agent.fake.state.intents) == 2


async def test_a_forged_or_stale_signature_changes_nothing(agent: Agent) -> None:
    agent.fake.webhooks.url = None  # the test delivers by hand
    payment_id = await paid(agent)
    event = next(e for e in agent.fake.state.events if e.type == "payment_intent.succeeded")
    payload = json.dumps(event.view()).encode()
    secret = agent.fake.webhook_secret
    refused = [
        {},
        {"Stripe-Signature": signature("whsec_forged", payload)},
        {"Stripe-Signature": signature(secret, payload, int(time.time()) - 301)},
        {"Stripe-Signature": signature(secret, payload + b" ")},
        {"Stripe-Signature": "t=abc,v1=def"},
    ]
    for headers in refused:
        resp = await agent.client.post(WEBHOOK, data=payload, headers=headers)
        assert (resp.status, await resp.json()) == (400, {"detail": "Invalid Stripe signature"}), headers
    huge = b"{" + b" " * (300 * 1024) + b"}"
    resp = await agent.client.post(WEBHOOK, data=huge, headers={"Stripe-Signature": signature(secret, huge)})
    assert resp.status == 413
    tampered = json.dumps({**event.view(), "id": "evt_other"}).encode()
    resp = await agent.client.post(
        WEBHOOK, data=tampered, headers={"Stripe-Signature": signature(secret, payload)}
    )
    assert resp.status == 400
    assert (await agent.credits())["credits_remaining"] == 0
    assert not await agent.provider.events.seen(event.id)

    resp = await agent.client.post(
        WEBHOOK, data=payload, headers={"Stripe-Signature": signature(secret, payload)}
    )
    assert (resp.status, await resp.json()) == (200, {"received": True, "duplicate": False, "ignored": False})
    resp = await agent.client.post(
        WEBHOOK, data=payload, headers={"Stripe-Signature": signature(secret, payload)}
    )
    assert (await resp.json())["duplicate"] is True
    assert (await agent.credits())["credits_remaining"] == 20
    assert (await agent.status(payment_id))["status"] == "succeeded"
    assert agent.service.counts.webhooks == {"refused": 6, "ok": 1, "duplicate": 1}


async def test_unknown_events_and_other_payments_are_answered_and_ignored(agent: Agent) -> None:
    secret = agent.fake.webhook_secret
    for kind, obj in (
        ("customer.created", {"id": "cus_1"}),
        ("payment_intent.succeeded", {"id": "pi_not_ours", "amount": 500, "currency": "usd"}),
        ("charge.refunded", {"id": "ch_1", "payment_intent": "pi_not_ours", "amount_refunded": 500}),
    ):
        payload = json.dumps(
            {"id": f"evt_{kind}", "object": "event", "type": kind, "created": 1, "data": {"object": obj}}
        ).encode()
        resp = await agent.client.post(
            WEBHOOK, data=payload, headers={"Stripe-Signature": signature(secret, payload)}
        )
        assert (resp.status, (await resp.json())["ignored"]) == (200, True), kind


async def test_a_webhook_failing_to_reach_the_agent_is_retried_and_credits_once(agent: Agent) -> None:
    agent.fake.webhooks.fail(2)
    agent.fake.webhooks.retry_seconds = 0.01
    await paid(agent)
    await agent.settled()
    assert (await agent.credits())["credits_remaining"] == 20
    assert sorted(d.status for d in agent.fake.webhooks.deliveries).count(0) == 2


def _account() -> object:
    from ciris_billing_proxy.ledger import Account

    return Account("local", "ann")


__all__ = ["PACKS"]


async def test_spends_racing_a_refund_and_its_repeats_leave_exact_credit_and_debt(agent: Agent) -> None:
    payment_id = await paid(agent)
    await agent.settled()
    hooks = agent.fake.webhooks
    hooks.copies = 3
    identity = agent.identity()

    async def spend(n: int) -> bool:
        try:
            await agent.service.spend(identity, f"race-{n}")
        except InsufficientCredit:
            return False
        return True

    async def refund() -> None:
        await asyncio.sleep(0.005)
        agent.fake.state.refund(agent.fake.state.charge_of(payment_id, None))
        await hooks.idle()

    results = await asyncio.gather(*(spend(n) for n in range(30)), refund())
    spent = sum(1 for ok in results[:30] if ok)
    await agent.settled()
    assert 0 < spent <= 20
    credits = await agent.credits()
    assert (credits["credits_remaining"], credits["total_uses"]) == (0, spent)
    assert (
        await agent.provider.records.owed("local", "ann") == spent
    )  # the 20 refunded: what was spent is owed
    # Giving back a spend after the clawback returns its use to the (clawed) grant: never a use out of
    # nothing beyond what the user had.
    for n in range(30):
        await agent.service.give_back(identity, f"race-{n}")
    credits = await agent.credits()
    assert credits["credits_remaining"] <= spent


async def test_stripe_down_is_a_503_that_starts_nothing_and_a_later_poll_credits(agent: Agent) -> None:
    agent.fake.fail_requests(1, status=500, method="POST")
    resp = await agent.client.post("/v1/api/billing/purchase/initiate", headers=agent.headers(), json={})
    assert resp.status == 503
    assert set(await resp.json()) == {"detail"}
    assert agent.fake.state.intents == {}
    agent.fake.webhooks.url = None  # only polls from here
    started = await agent.initiate()
    agent.fake.state.confirm(started["payment_id"], "pm_card_visa")
    # Dropped twice (aiohttp tries an idempotent request again once on a fresh connection).
    agent.fake.fail_requests(2, status=0, path=f"/v1/payment_intents/{started['payment_id']}")
    code, body = await agent.get(f"/purchase/status/{started['payment_id']}")
    assert (code, set(body)) == (503, {"detail"})
    assert (await agent.credits())["credits_remaining"] == 0
    assert (await agent.status(started["payment_id"]))["status"] == "succeeded"
    assert (await agent.credits())["credits_remaining"] == 20


async def test_the_python_client_buys_a_chosen_pack(agent: Agent) -> None:
    from ciris_billing_proxy.client import BillingClient

    async with BillingClient(str(agent.client.make_url("")), token=agent.tokens.token("ann")) as client:
        capabilities = await client.capabilities()
        assert [p.id for p in capabilities.packs] == ["small", "big"]
        started = await client.initiate_purchase(pack="big")
    assert started.uses_purchased == 100


async def test_the_admin_routes_and_usage_work_on_the_stripe_ledger(agent: Agent) -> None:
    payment_id = await paid(agent)
    await agent.settled()
    admin = agent.tokens.headers("root", role="admin")
    resp = await agent.client.post(
        "/v1/api/billing/admin/users/ann/grants",
        headers=admin,
        json={"amount": 5, "kind": "promotional", "reason": "goodwill"},
    )
    assert resp.status in (200, 201), await resp.text()
    resp = await agent.client.get("/v1/api/billing/admin/users/ann/credits", headers=admin)
    assert resp.status == 200
    grants = (await resp.json())["grants"]
    assert sorted((g["kind"], g["source"], g["amount"]) for g in grants) == [
        ("paid", "purchase", 20),
        ("promotional", "admin", 5),
    ]
    assert (await agent.credits())["credits_remaining"] == 25
    agent.fake.state.refund(agent.fake.state.charge_of(payment_id, None))
    await agent.settled()
    assert (await agent.credits())["credits_remaining"] == 5  # the purchase's 20 taken back, the gift kept
    code, _ = await agent.get("/usage")
    assert code == 200


async def test_clawback_steps_racing_with_rising_targets_take_each_use_once(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    payment_id = await paid(agent, pack="big")  # 100 uses for $20.00
    await agent.settled()
    records, settlement = agent.provider.records, agent.provider.settlement
    payment = await agent.provider.payments.get(payment_id)
    assert payment is not None
    # Two handlers read the payment before either begins its step: one saw a refund of a tenth, the
    # other, a moment later, of a fifth (two partial refunds delivered at once).
    read_state, seen, both = records.state, [], asyncio.Event()

    async def state(pid: str) -> Any:
        found = await read_state(pid)
        if found is not None and found.claw_target > found.clawed and len(seen) < 2:
            seen.append(found.claw_target)
            if len(seen) == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 5)
        return found

    monkeypatch.setattr(records, "state", state)

    async def refund_to(target: int) -> None:
        await records.raise_claw_target(payment_id, target)
        await settlement._finish(payment)

    first = asyncio.ensure_future(refund_to(10))
    await asyncio.sleep(0.05)  # its read made (it waits for the other's)
    await asyncio.gather(first, refund_to(20))
    assert seen == [10, 20]
    done = await read_state(payment_id)
    assert done is not None
    assert (done.clawed, done.claw_pending) == (20, None)
    assert (await agent.credits())["credits_remaining"] == 80
    clawed = await events_of(agent, "credit.clawed_back")
    assert sum(int(str(e["amount"])) for e in clawed) == 20
