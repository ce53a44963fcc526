"""The paid flow through the proxy with the `ciris` provider, against the fake backend over real HTTP."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, Identity, setup_billing
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import INTERACT, agent_routes, paid_user, who, with_options
from .conftest import ClientFactory
from .default_paths import CREDITS, INITIATE, STATUS


@pytest.fixture
async def ciris_client(ciris_billing_config: BillingConfig, make_client: ClientFactory) -> Any:
    # The fake backend (behind the config) is set up first, so it is torn down after the app.
    return await make_client(ciris_billing_config, host=agent_routes)


async def test_the_whole_paid_flow(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    fake = ciris_fake_backend
    auth = ciris_tokens.headers("alice", email="alice@example.com")
    first = await (await ciris_client.get(CREDITS, headers=auth)).json()
    assert (first["free_uses_remaining"], first["credits_remaining"], first["has_credit"]) == (12, 0, True)
    assert first["daily_free_uses_included"] == 2  # daily uses are counted into free_uses_remaining

    statuses = [(await ciris_client.post(INTERACT, json={}, headers=auth)).status for _ in range(13)]
    assert statuses == [200] * 12 + [402]

    empty = await (await ciris_client.get(CREDITS, headers=auth)).json()
    assert empty == {
        "has_credit": False,
        "credits_remaining": 0,
        "free_uses_remaining": 0,
        "total_uses": 12,
        "plan_name": "free",
        "purchase_required": True,
        "purchase_options": {"price_minor": 500, "uses": 20, "currency": "USD"},
        "reason": "No free uses or credits remaining",
        "daily_free_uses_limit": 2,
        "daily_free_uses_included": 0,
    }

    resp = await ciris_client.post(INITIATE, json={"return_url": "https://ui.example/done"}, headers=auth)
    assert resp.status == 200
    purchase = await resp.json()
    assert set(purchase) == {
        "payment_id",
        "client_secret",
        "amount_minor",
        "currency",
        "uses_purchased",
        "publishable_key",
    }
    assert (purchase["amount_minor"], purchase["uses_purchased"], purchase["currency"]) == (500, 20, "USD")
    assert purchase["publishable_key"] == "pk_test_fake_backend"
    assert purchase["client_secret"].startswith(purchase["payment_id"])

    status_path = STATUS + purchase["payment_id"]
    before = await (await ciris_client.get(status_path, headers=auth)).json()
    assert before == {"status": "requires_payment_method", "credits_added": 0, "balance_after": 0}

    fake.confirm_payment(purchase["payment_id"], webhook_delay=None)
    processing = await (await ciris_client.get(status_path, headers=auth)).json()
    assert processing == {"status": "processing", "credits_added": 0, "balance_after": 0}

    fake.deliver_webhook(purchase["payment_id"])
    done = await (await ciris_client.get(status_path, headers=auth)).json()
    assert done == {"status": "succeeded", "credits_added": 20, "balance_after": 20}

    after = await (await ciris_client.get(CREDITS, headers=auth)).json()
    assert (after["has_credit"], after["credits_remaining"], after["purchase_required"]) == (True, 20, False)
    assert after["credits_remaining"] == done["balance_after"]

    assert (await ciris_client.post(INTERACT, json={}, headers=auth)).status == 200
    assert fake.account(*who("alice"))["credits_remaining"] == 19
    again = await (await ciris_client.get(status_path, headers=auth)).json()
    assert again == done  # a settled payment answers the same, from the record


async def test_backend_price_is_never_hard_coded(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    ciris_fake_backend.pricing.price_per_purchase_minor = 999
    ciris_fake_backend.pricing.paid_uses_per_purchase = 7
    client = await make_client(ciris_billing_config)
    auth = ciris_tokens.headers("bob", email="bob@example.com")
    await client.get(CREDITS, headers=auth)
    ciris_fake_backend.use_up_free_uses(*who("bob"))
    client.app[SERVICE_KEY].invalidate(Identity("bob", "local", "OBSERVER"))
    status = await (await client.get(CREDITS, headers=auth)).json()
    assert status["purchase_options"] == {"price_minor": 999, "uses": 7, "currency": "USD"}
    purchase = await (await client.post(INITIATE, json={}, headers=auth)).json()
    assert (purchase["amount_minor"], purchase["uses_purchased"]) == (999, 7)


async def test_one_identity_for_credits_gate_and_purchases(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("carol", email="carol@example.com", oauth_provider="google")
    await ciris_client.get(CREDITS, headers=auth)
    await ciris_client.post(INTERACT, json={}, headers=auth)
    await ciris_client.post(INITIATE, json={}, headers=auth)
    identities = {(b["oauth_provider"], b["external_id"]) for _, b, _ in ciris_fake_backend.received if b}
    assert identities == {("oauth:google", "carol")}
    emails = {b.get("customer_email") for _, b, _ in ciris_fake_backend.received if b}
    assert emails == {"carol@example.com"}


async def test_charges_use_one_credit_and_namespaced_deterministic_keys(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("dan")
    for _ in range(2):
        assert (await ciris_client.post(INTERACT, json={}, headers=auth)).status == 200
    charges = [b for endpoint, b, _ in ciris_fake_backend.received if endpoint == "charges"]
    assert len(charges) == 2
    for body in charges:
        assert (body["amount_minor"], body["currency"]) == (1, "USD")
        assert body["idempotency_key"].startswith("test-agent-charge-")
    assert charges[0]["idempotency_key"] != charges[1]["idempotency_key"]


async def test_first_charge_of_a_new_user_checks_first(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    assert (await ciris_client.post(INTERACT, json={}, headers=ciris_tokens.headers("erin"))).status == 200
    order = [endpoint for endpoint, _, _ in ciris_fake_backend.received]
    assert order[:2] == ["credits/check", "charges"]


async def test_a_failed_interaction_is_refunded(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = await paid_user(ciris_client, ciris_fake_backend, ciris_tokens, "fay", 3)
    assert (await ciris_client.post(INTERACT, json={"fail": True}, headers=auth)).status == 502
    assert ciris_fake_backend.account(*who("fay"))["credits_remaining"] == 3
    refunds = [b for endpoint, b, _ in ciris_fake_backend.received if endpoint == "credits"]
    assert len(refunds) == 1
    assert (refunds[0]["transaction_type"], refunds[0]["amount_minor"]) == ("refund", 1)
    assert refunds[0]["idempotency_key"].startswith("test-agent-refund-")


async def test_duplicate_charge_answers_count_as_success(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_billing_config: BillingConfig
) -> None:
    service = ciris_client.app[SERVICE_KEY]
    gina = Identity("gina", "local", "OBSERVER")
    await service.spend(gina, "request-1")
    await service.spend(gina, "request-1")  # 409 + X-Existing-Charge-ID
    ciris_fake_backend.duplicate_charges_as_201 = True
    await service.spend(gina, "request-1")  # 201 with the same charge_id
    assert ciris_fake_backend.account(*who("gina"))["total_uses"] == 1


async def test_suspended_account(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("hal")
    await ciris_client.get(CREDITS, headers=auth)
    ciris_fake_backend.set_account_status(*who("hal"), "suspended")
    resp = await ciris_client.post(INTERACT, json={}, headers=auth)
    assert resp.status == 402
    assert (await resp.json())["detail"]["reason"] == "Account suspended"
    status = await (await ciris_client.get(CREDITS, headers=auth)).json()
    assert (status["has_credit"], status["purchase_required"], status["free_uses_remaining"]) == (
        False,
        False,
        0,
    )
    assert status["reason"] == "Account suspended"


async def test_user_b_cannot_see_user_a_payment(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    alice = ciris_tokens.headers("alice", email="a@example.com")
    purchase = await (await ciris_client.post(INITIATE, json={}, headers=alice)).json()
    calls = ciris_fake_backend.calls["purchase_status"]
    for bob in (
        ciris_tokens.headers("bob", email="b@example.com"),
        ciris_tokens.headers("alice", oauth_provider="google"),
    ):
        resp = await ciris_client.get(STATUS + purchase["payment_id"], headers=bob)
        assert resp.status == 404
        assert await resp.json() == {"detail": "Payment not found"}
    resp = await ciris_client.get(STATUS + "pi_neverissued", headers=alice)
    assert resp.status == 404
    assert ciris_fake_backend.calls["purchase_status"] == calls  # refused without asking the backend


async def test_purchase_needs_an_email(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    resp = await ciris_client.post(INITIATE, json={}, headers=ciris_tokens.headers("ivy"))
    assert resp.status == 400
    assert await resp.json() == {"detail": "Email address required for purchase"}
    assert ciris_fake_backend.calls["purchases"] == 0


async def test_concurrent_initiates_make_one_payment_intent(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    ciris_fake_backend.inject("latency", endpoint="purchases", seconds=0.2)
    auth = ciris_tokens.headers("jo", email="jo@example.com")
    replies = await asyncio.gather(*(ciris_client.post(INITIATE, json={}, headers=auth) for _ in range(2)))
    ids = {(await r.json())["payment_id"] for r in replies}
    assert len(ids) == 1
    assert ciris_fake_backend.calls["purchases"] == 1


async def test_idempotency_key_replays_and_a_new_key_buys_again(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    config = with_options(ciris_billing_config, purchase_reuse_seconds=0)
    client = await make_client(config)
    auth = ciris_tokens.headers("kim", email="kim@example.com")
    one = await (await client.post(INITIATE, json={}, headers={**auth, "Idempotency-Key": "click-1"})).json()
    two = await (await client.post(INITIATE, json={}, headers={**auth, "Idempotency-Key": "click-1"})).json()
    assert one == two
    assert ciris_fake_backend.calls["purchases"] == 1
    ciris_fake_backend.ledger.clock_offset += timedelta(seconds=2)
    three = await (
        await client.post(INITIATE, json={}, headers={**auth, "Idempotency-Key": "click-2"})
    ).json()
    assert three["payment_id"] != one["payment_id"]
    other = ciris_tokens.headers("lee", email="lee@example.com")
    four = await (
        await client.post(INITIATE, json={}, headers={**other, "Idempotency-Key": "click-1"})
    ).json()
    assert four["payment_id"] not in {one["payment_id"], three["payment_id"]}  # keys are per user


async def test_a_double_click_reuses_the_recent_purchase(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("max", email="max@example.com")
    one = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    ciris_fake_backend.ledger.clock_offset += timedelta(seconds=2)
    two = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    assert one["payment_id"] == two["payment_id"]
    assert ciris_fake_backend.calls["purchases"] == 1


@pytest.mark.parametrize("polled", [True, False], ids=["status polled", "never polled"])
@pytest.mark.parametrize("outcome", ["succeeded", "canceled", "processing"])
async def test_a_click_after_the_payment_ended_buys_anew(
    ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    outcome: str,
    polled: bool,
) -> None:
    """Only a payment still waiting for the user is handed back for a double click: Stripe cannot
    confirm one that succeeded, failed or was canceled (whether or not this proxy saw it end)."""
    fake = ciris_fake_backend
    auth = ciris_tokens.headers("ola", email="ola@example.com")
    one = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    if outcome == "succeeded":
        fake.confirm_payment(one["payment_id"])
    else:
        fake.ledger.set_payment_status(one["payment_id"], outcome)
    if polled:
        assert (await (await ciris_client.get(STATUS + one["payment_id"], headers=auth)).json())[
            "status"
        ] == outcome
    fake.ledger.clock_offset += timedelta(seconds=2)
    two = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    assert two["payment_id"] != one["payment_id"]
    assert two["client_secret"] != one["client_secret"]
    assert fake.calls["purchases"] == 2
    fake.ledger.set_payment_status(two["payment_id"], "canceled")
    later = await (await ciris_client.get(STATUS + two["payment_id"], headers=auth)).json()
    assert later["status"] == "canceled"  # the new payment's own fate, not the old one's success


async def test_a_click_in_the_same_second_as_a_paid_purchase_buys_anew(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    """The backend answers a purchase in the same second as the last with that (paid) PaymentIntent."""
    fake = ciris_fake_backend
    fake.ledger.clock_offset = timedelta(seconds=1.02 - time.time() % 1.0)  # early in a fake second
    auth = ciris_tokens.headers("rex", email="rex@example.com")
    one = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    fake.confirm_payment(one["payment_id"])
    two = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    assert two["payment_id"] != one["payment_id"]
    assert fake.calls["purchases"] == 3  # the replayed one, then a new one a second later
    assert fake.ledger.payments[two["payment_id"]].status == "requires_payment_method"


async def test_a_purchase_the_backend_replays_from_the_same_second_is_not_handed_out_as_new(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    """Stripe replays a repeated idempotency key's creation reply, status and all: a payment the
    proxy already recorded is recognised as a replay whatever status it shows."""
    fake = ciris_fake_backend
    config = with_options(ciris_billing_config, purchase_reuse_seconds=0)
    client = await make_client(config)
    fake.ledger.clock_offset = timedelta(seconds=1.02 - time.time() % 1.0)  # early in a fake second
    auth = ciris_tokens.headers("sam", email="sam@example.com")
    one = await (await client.post(INITIATE, json={}, headers=auth)).json()
    two = await (await client.post(INITIATE, json={}, headers=auth)).json()
    assert two["payment_id"] != one["payment_id"]
    assert fake.calls["purchases"] == 3


async def test_a_declined_card_keeps_the_payment_for_the_next_click(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("pat", email="pat@example.com")
    one = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    ciris_fake_backend.fail_payment(one["payment_id"])  # back to requires_payment_method
    ciris_fake_backend.ledger.clock_offset += timedelta(seconds=2)
    two = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    assert two == one  # the user can still pay it with another card
    assert ciris_fake_backend.calls["purchases"] == 1


async def test_an_idempotency_key_replays_even_after_the_payment_succeeded(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = {**ciris_tokens.headers("quin", email="quin@example.com"), "Idempotency-Key": "buy-1"}
    one = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    ciris_fake_backend.confirm_payment(one["payment_id"])
    two = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    assert two == one  # that is what the key means


async def test_restart_between_initiate_and_status(
    aiohttp_client: Any,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    auth = ciris_tokens.headers("ned", email="ned@example.com")

    async def fresh_client() -> Any:
        app = web.Application()
        setup_billing(app, ciris_billing_config, environ={})
        return await aiohttp_client(app)

    first = await fresh_client()
    purchase = await (await first.post(INITIATE, json={}, headers=auth)).json()
    await first.close()
    ciris_fake_backend.confirm_payment(purchase["payment_id"])
    second = await fresh_client()
    done = await (await second.get(STATUS + purchase["payment_id"], headers=auth)).json()
    assert done == {"status": "succeeded", "credits_added": 20, "balance_after": 20}
    other = await second.get(STATUS + purchase["payment_id"], headers=ciris_tokens.headers("eve"))
    assert other.status == 404


@pytest.mark.parametrize(
    ("stripe", "shown"),
    [
        ("requires_payment_method", "requires_payment_method"),
        ("requires_action", "requires_action"),
        ("canceled", "canceled"),
        ("processing", "processing"),
        ("something_new", "unknown"),
    ],
)
async def test_other_stripe_statuses_pass_through(
    ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    stripe: str,
    shown: str,
) -> None:
    auth = ciris_tokens.headers("ola", email="ola@example.com")
    purchase = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    ciris_fake_backend.fail_payment(purchase["payment_id"], stripe)
    body = await (await ciris_client.get(STATUS + purchase["payment_id"], headers=auth)).json()
    assert body == {"status": shown, "credits_added": 0, "balance_after": 0}


async def test_credits_found_by_transaction_when_the_user_spent_meanwhile(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = await paid_user(ciris_client, ciris_fake_backend, ciris_tokens, "pia", 5, email="pia@example.com")
    purchase = await (await ciris_client.post(INITIATE, json={}, headers=auth)).json()
    for _ in range(5):  # spends the 5 paid credits before the webhook lands
        assert (await ciris_client.post(INTERACT, json={}, headers=auth)).status == 200
    ciris_fake_backend.confirm_payment(purchase["payment_id"])
    done = await (await ciris_client.get(STATUS + purchase["payment_id"], headers=auth)).json()
    assert done == {"status": "succeeded", "credits_added": 20, "balance_after": 20}


async def test_waiting_for_credits_is_bounded(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = with_options(ciris_billing_config, credit_wait_seconds=0.05)
    client = await make_client(config)
    auth = ciris_tokens.headers("quinn", email="q@example.com")
    purchase = await (await client.post(INITIATE, json={}, headers=auth)).json()
    ciris_fake_backend.confirm_payment(purchase["payment_id"], webhook_delay=None)
    path = STATUS + purchase["payment_id"]
    assert (await (await client.get(path, headers=auth)).json())["status"] == "processing"
    await asyncio.sleep(0.1)
    assert (await (await client.get(path, headers=auth)).json())["status"] == "unknown"
    assert "credits have not landed" in caplog.text
    ciris_fake_backend.deliver_webhook(purchase["payment_id"])
    assert (await (await client.get(path, headers=auth)).json())["status"] == "succeeded"


async def test_failed_interactions_never_turn_free_uses_into_paid_credits(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("tricky")
    for _ in range(12):  # every free use (10 one-time + 2 daily) spent on a failing interaction
        assert (await ciris_client.post(INTERACT, json={"fail": True}, headers=auth)).status == 502
    account = ciris_fake_backend.account(*who("tricky"))
    assert account["credits_remaining"] == 0
    assert ciris_fake_backend.calls["credits"] == 0  # no refund for a free use: it would mint a credit


async def test_succeeded_waits_for_this_payments_own_credit(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    # Without the double-click window, so that the second key starts a second payment.
    ciris_client = await make_client(with_options(ciris_billing_config, purchase_reuse_seconds=0))
    auth = ciris_tokens.headers("two", email="two@example.com")
    first = await (
        await ciris_client.post(INITIATE, json={}, headers={**auth, "Idempotency-Key": "a"})
    ).json()
    ciris_fake_backend.ledger.clock_offset += timedelta(seconds=2)
    second = await (
        await ciris_client.post(INITIATE, json={}, headers={**auth, "Idempotency-Key": "b"})
    ).json()
    assert first["payment_id"] != second["payment_id"]
    ciris_fake_backend.confirm_payment(first["payment_id"], webhook_delay=None)
    ciris_fake_backend.confirm_payment(second["payment_id"])  # only the second is credited
    a = await (await ciris_client.get(STATUS + first["payment_id"], headers=auth)).json()
    assert a["status"] == "processing"
    b = await (await ciris_client.get(STATUS + second["payment_id"], headers=auth)).json()
    assert b == {"status": "succeeded", "credits_added": 20, "balance_after": 20}


async def test_a_suspended_account_cannot_buy(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("sus", email="sus@example.com")
    await ciris_client.get(CREDITS, headers=auth)
    ciris_fake_backend.set_account_status(*who("sus"), "suspended")
    resp = await ciris_client.post(INITIATE, json={}, headers=auth)
    assert resp.status == 400
    assert await resp.json() == {"detail": "Account suspended: purchases are not possible"}
    assert ciris_fake_backend.calls["purchases"] == 0


async def test_local_users_of_two_agents_are_two_accounts(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    one = await make_client(ciris_billing_config)
    two = await make_client(ciris_billing_config.model_copy(update={"agent_id": "other-agent"}))
    for agent in (one, two):
        await agent.get(CREDITS, headers=ciris_tokens.headers("admin"))
    ciris_fake_backend.grant(*who("admin"), 20)
    for agent in (one, two):
        agent.app[SERVICE_KEY].invalidate(Identity("admin", "local", "OBSERVER"))
    one_admin = await (await one.get(CREDITS, headers=ciris_tokens.headers("admin"))).json()
    two_admin = await (await two.get(CREDITS, headers=ciris_tokens.headers("admin"))).json()
    assert (one_admin["credits_remaining"], two_admin["credits_remaining"]) == (20, 0)
    # A federated identity (a Google subject) is the same person on every agent.
    google = ciris_tokens.headers("118234567890", oauth_provider="google")
    for agent in (one, two):
        await agent.get(CREDITS, headers=google)
    assert ("oauth:google", "118234567890") in ciris_fake_backend.ledger.accounts


async def test_no_publishable_key_anywhere_is_503(
    ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ciris_fake_backend.pricing.publishable_key = ""
    resp = await ciris_client.post(
        INITIATE, json={}, headers=ciris_tokens.headers("nokey", email="n@example.com")
    )
    assert resp.status == 503
    assert "publishable key" in caplog.text
