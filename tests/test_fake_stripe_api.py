"""The fake Stripe API as Stripe's official library sees it (its async client through the API base), and
its webhooks as the library verifies them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web

from ciris_billing_proxy.testing.fake_stripe_api import FakeStripeAPI


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripeAPI]:
    api = FakeStripeAPI()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def client(fake: FakeStripeAPI) -> AsyncIterator[Any]:
    async with aiohttp.ClientSession() as session:
        yield stripe.StripeClient(
            fake.secret_key,
            base_addresses={"api": fake.url},
            http_client=stripe.AIOHTTPClient(session=session),
            max_network_retries=0,
        )


async def test_payment_intents_with_test_payment_methods(fake: FakeStripeAPI, client: Any) -> None:
    intents = client.v1.payment_intents
    params = {"amount": 500, "currency": "usd", "metadata": {"pack": "small"}}
    created = await intents.create_async(params=params, options={"idempotency_key": "k1"})
    assert (created.status, created.amount, created.metadata["pack"]) == (
        "requires_payment_method",
        500,
        "small",
    )
    again = await intents.create_async(params=params, options={"idempotency_key": "k1"})
    assert again.id == created.id
    assert len(fake.state.intents) == 1
    with pytest.raises(stripe.IdempotencyError):
        await intents.create_async(params={**params, "amount": 600}, options={"idempotency_key": "k1"})

    with pytest.raises(stripe.CardError) as declined:
        await intents.confirm_async(
            created.id, params={"payment_method": "pm_card_chargeDeclinedInsufficientFunds"}
        )
    assert (declined.value.code, declined.value.error.decline_code) == ("card_declined", "insufficient_funds")
    after = await intents.retrieve_async(created.id)
    assert after.status == "requires_payment_method"
    assert after.last_payment_error.decline_code == "insufficient_funds"

    paid = await intents.confirm_async(created.id, params={"payment_method": "pm_card_visa"})
    assert (paid.status, paid.amount_received) == ("succeeded", 500)
    with pytest.raises(stripe.InvalidRequestError):
        await intents.cancel_async(created.id)
    refund = await client.v1.refunds.create_async(params={"payment_intent": created.id, "amount": 200})
    assert refund.amount == 200
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.refunds.create_async(params={"payment_intent": created.id, "amount": 400})
    assert fake.state.charges[paid.latest_charge].amount_refunded == 200

    other = await intents.create_async(params={"amount": 900, "currency": "eur"})
    assert (await intents.cancel_async(other.id)).status == "canceled"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await intents.retrieve_async("pi_missing")
    assert missing.value.http_status == 404
    listed = await intents.list_async(params={"limit": 1})
    assert [i.id for i in listed.data] == [other.id]
    events = await client.v1.events.list_async(params={"limit": 100})
    assert [e.type for e in events.data][::-1] == [
        "payment_intent.created",
        "charge.failed",
        "payment_intent.payment_failed",
        "charge.succeeded",
        "payment_intent.succeeded",
        "refund.created",
        "charge.refunded",
        "payment_intent.created",
        "payment_intent.canceled",
    ]


async def test_a_wrong_key_and_injected_faults(fake: FakeStripeAPI, client: Any) -> None:
    async with aiohttp.ClientSession() as session:
        wrong = stripe.StripeClient(
            "sk_test_wrong",
            base_addresses={"api": fake.url},
            http_client=stripe.AIOHTTPClient(session=session),
        )
        with pytest.raises(stripe.AuthenticationError):
            await wrong.v1.payment_intents.list_async()
    fake.fail_requests(1, status=500, method="POST")
    with pytest.raises(stripe.APIError):
        await client.v1.payment_intents.create_async(params={"amount": 500, "currency": "usd"})
    assert fake.state.intents == {}
    created = await client.v1.payment_intents.create_async(params={"amount": 500, "currency": "usd"})
    assert created.status == "requires_payment_method"


async def test_webhooks_are_signed_as_stripe_signs_them_with_delivery_faults(
    fake: FakeStripeAPI, aiohttp_server: Any
) -> None:
    received: list[str] = []
    answers = [500, 200]

    async def hook(request: web.Request) -> web.Response:
        payload = await request.read()
        event = stripe.Webhook.construct_event(
            payload, request.headers["Stripe-Signature"], fake.webhook_secret
        )
        received.append(event.type)
        return web.Response(status=answers.pop(0) if answers else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    hooks = fake.webhooks
    hooks.url = str(server.make_url("/hook"))
    hooks.retry_seconds = 0.01
    intent = fake.state.create_intent(500, "usd", {})
    await hooks.idle()
    assert received == ["payment_intent.created", "payment_intent.created"]  # a 500, then retried
    assert [d.status for d in hooks.deliveries] == [500, 200]

    hooks.hold()
    fake.state.confirm(intent.id, "pm_card_visa")
    assert received == ["payment_intent.created"] * 2  # held back
    hooks.release("reverse")
    await hooks.idle()
    assert received[2:] == ["payment_intent.succeeded", "charge.succeeded"]

    hooks.copies = 3
    hooks.drop(1)
    fake.state.refund(fake.state.charge_of(intent.id, None))  # refund.created dropped, charge.refunded x3
    await hooks.idle()
    assert received[4:] == ["charge.refunded"] * 3
    payload = json.dumps(fake.state.events[-1].view()).encode()
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, "t=1,v1=00", fake.webhook_secret)
