"""The fake Stripe of `serve --fake-backend`: its script, and its confirm call playing Stripe's test
cards against the fake billing backend, over real HTTP (the browser tests drive it from a page)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory
from ciris_billing_proxy.tools.demo import create_demo_app
from ciris_billing_proxy.tools.users import UserStore

from .default_paths import CAPABILITIES, INITIATE, STATUS

CARD = {"exp_month": 12, "exp_year": 2099, "cvc": "123"}


@pytest.fixture
async def demo(
    aiohttp_client: Any, ciris_billing_config: BillingConfig, ciris_fake_backend: FakeBillingBackend
) -> Any:
    return await aiohttp_client(
        create_demo_app(ciris_billing_config, UserStore(), fake_backend=ciris_fake_backend)
    )


async def purchase(demo: Any, tokens: TokenFactory, user: str = "ann") -> dict[str, Any]:
    headers = tokens.headers(user, email=f"{user}@example.com")
    resp = await demo.post(INITIATE, headers=headers, json={})
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def confirm(demo: Any, client_secret: str, number: str) -> Any:
    return await demo.post(
        "/_fake_stripe/confirm", json={"client_secret": client_secret, "card": {"number": number, **CARD}}
    )


async def test_the_script_is_served_and_named_in_the_capabilities(
    demo: Any, ciris_tokens: TokenFactory
) -> None:
    script = await demo.get("/_fake_stripe/stripe.js")
    assert script.status == 200
    assert script.content_type == "text/javascript"
    assert "window.Stripe = Stripe" in await script.text()
    # Any page's <ciris-billing> learns it here, without a stripe-js attribute.
    capabilities = await (await demo.get(CAPABILITIES, headers=ciris_tokens.headers("ann"))).json()
    assert capabilities["stripe_js"] == "/_fake_stripe/stripe.js"
    page = await (await demo.get("/")).text()
    assert "stripe" not in page.lower()
    assert "ciris (fake backend)" in page


async def test_the_success_card_pays_and_the_webhook_follows(
    demo: Any, ciris_tokens: TokenFactory, ciris_fake_backend: FakeBillingBackend
) -> None:
    bought = await purchase(demo, ciris_tokens)
    resp = await confirm(demo, bought["client_secret"], "4242424242424242")
    assert resp.status == 200
    intent = (await resp.json())["payment_intent"]
    assert intent == {
        "id": bought["payment_id"],
        "object": "payment_intent",
        "status": "succeeded",
        "amount": 500,
        "currency": "usd",
    }
    assert bought["client_secret"] not in await resp.text()
    headers = ciris_tokens.headers("ann", email="ann@example.com")
    status_url = STATUS + bought["payment_id"]
    for _ in range(100):  # the webhook lands after the fake Stripe's delay
        status = await (await demo.get(status_url, headers=headers)).json()
        if status["status"] == "succeeded":
            break
        assert status["status"] == "processing"
        await asyncio.sleep(0.1)
    assert status == {"status": "succeeded", "credits_added": 20, "balance_after": 20}
    again = await confirm(demo, bought["client_secret"], "4242424242424242")
    assert again.status == 400
    assert (await again.json())["error"]["code"] == "payment_intent_unexpected_state"


@pytest.mark.parametrize(
    ("number", "decline_code", "message"),
    [
        ("4000000000000002", "generic_decline", "Your card was declined."),
        ("4000000000009995", "insufficient_funds", "Your card has insufficient funds."),
        ("5555555555554444", "generic_decline", "Your card was declined. This is a fake Stripe"),
    ],
)
async def test_refused_cards_leave_the_payment_waiting_for_another(
    demo: Any,
    ciris_tokens: TokenFactory,
    ciris_fake_backend: FakeBillingBackend,
    number: str,
    decline_code: str,
    message: str,
) -> None:
    bought = await purchase(demo, ciris_tokens)
    resp = await confirm(demo, bought["client_secret"], number)
    assert resp.status == 402
    body = await resp.json()
    assert body["detail"].startswith(message)
    assert body["error"]["type"] == "card_error"
    assert body["error"]["code"] == "card_declined"
    assert body["error"]["decline_code"] == decline_code
    assert ciris_fake_backend.ledger.payments[bought["payment_id"]].status == "requires_payment_method"
    assert (await confirm(demo, bought["client_secret"], "4242424242424242")).status == 200


async def test_a_wrong_client_secret_confirms_nothing(
    demo: Any, ciris_tokens: TokenFactory, ciris_fake_backend: FakeBillingBackend
) -> None:
    bought = await purchase(demo, ciris_tokens)
    forged = bought["client_secret"][:-4] + "0000"
    resp = await confirm(demo, forged, "4242424242424242")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "resource_missing"
    assert ciris_fake_backend.ledger.payments[bought["payment_id"]].status == "requires_payment_method"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"client_secret": "x"},
        {"client_secret": "x", "card": {"number": "4242", **CARD}},
        {"client_secret": "x", "card": {"number": "4242424242424242", **CARD, "exp_month": 13}},
        {"client_secret": 5, "card": {"number": "4242424242424242", **CARD}},
    ],
)
async def test_a_malformed_confirm_is_a_json_422(demo: Any, body: dict[str, Any]) -> None:
    resp = await demo.post("/_fake_stripe/confirm", json=body)
    assert resp.status == 422
    assert "detail" in await resp.json()


async def test_without_the_fake_backend_there_is_no_fake_stripe(
    aiohttp_client: Any, ciris_billing_config: BillingConfig
) -> None:
    client = await aiohttp_client(create_demo_app(ciris_billing_config, UserStore()))
    assert (await client.get("/_fake_stripe/stripe.js")).status == 404
    capabilities = await (
        await client.get(CAPABILITIES, headers=TokenFactory(ciris_billing_config).headers("ann"))
    ).json()
    assert "stripe_js" not in capabilities  # the element loads Stripe's own
