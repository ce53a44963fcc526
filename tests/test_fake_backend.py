"""The fake backend reproduces docs/billing-backend.md, quirks included (checked over real HTTP)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from ciris_billing_proxy.testing import FakeBillingBackend
from ciris_billing_proxy.testing.fake_backend import READ

WHO = {"oauth_provider": "oauth:google", "external_id": "118234567890"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeBillingBackend]:
    backend = FakeBillingBackend()
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture
async def http(fake: FakeBillingBackend) -> AsyncIterator[Any]:
    async with aiohttp.ClientSession(base_url=fake.url, headers={"X-API-Key": fake.api_key}) as session:
        yield session


async def call(session: Any, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with session.request(method, path, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body, resp.headers


async def test_missing_key_is_422_on_write_and_401_on_check(fake: FakeBillingBackend) -> None:
    async with aiohttp.ClientSession(base_url=fake.url) as bare:
        status, body, _ = await call(bare, "POST", "/v1/billing/charges", json={**WHO})
        assert status == 422
        assert body["detail"][0] == {
            "type": "missing",
            "loc": ["header", "x-api-key"],
            "msg": "Field required",
            "input": None,
        }
        assert len(body["detail"]) > 1  # body errors appended
        status, body, headers = await call(bare, "POST", "/v1/billing/credits/check", json=WHO)
        assert status == 401
        assert body["detail"].startswith("Authentication required")
        assert headers["WWW-Authenticate"] == "Bearer, ApiKey"


async def test_bad_keys(fake: FakeBillingBackend) -> None:
    cases = [("nope", "Invalid API key format"), ("cbk_test_unknown", "Invalid API key")]
    for key, words in cases:
        async with aiohttp.ClientSession(base_url=fake.url, headers={"X-API-Key": key}) as s:
            status, body, headers = await call(s, "POST", "/v1/billing/charges", json={"junk": 1})
            assert (status, body["detail"]) == (401, f"Authentication failed: {words}")  # auth before body
            assert headers["WWW-Authenticate"] == "ApiKey"
            status, body, _ = await call(s, "POST", "/v1/billing/credits/check", json=WHO)
            assert (status, body["detail"]) == (401, f"Invalid API key: Authentication failed: {words}")
    read_only = fake.add_api_key({READ})
    async with aiohttp.ClientSession(base_url=fake.url, headers={"X-API-Key": read_only}) as s:
        status, body, _ = await call(s, "POST", "/v1/billing/charges", json=WHO)
        assert (status, body["detail"]) == (403, "Missing required permission: billing:write")


async def test_identity_validation(http: Any) -> None:
    status, body, _ = await call(
        http, "POST", "/v1/billing/credits/check", json={**WHO, "oauth_provider": "google"}
    )
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "oauth_provider"]
    assert 'must start with "oauth:"' in body["detail"][0]["msg"]
    status, body, _ = await call(http, "POST", "/v1/billing/credits/check", data=b"{bad")
    assert (status, body["detail"][0]["type"]) == (422, "json_invalid")


async def test_check_creates_accounts_charges_do_not(http: Any) -> None:
    charge = {**WHO, "amount_minor": 1, "currency": "usd", "description": "x"}
    status, body, _ = await call(http, "POST", "/v1/billing/charges", json=charge)
    assert (status, body) == (404, {"detail": "Account not found"})
    status, body, _ = await call(http, "POST", "/v1/billing/credits/check", json=WHO)
    assert status == 200
    assert body == {
        "has_credit": True,
        "credits_remaining": 0,
        "plan_name": "free",
        "reason": None,
        "free_uses_remaining": 10,
        "total_uses": 0,
        "purchase_required": False,
        "purchase_price_minor": 0,
        "purchase_uses": 0,
        "daily_free_uses_remaining": 2,
        "daily_free_uses_limit": 2,
    }
    assert (await call(http, "POST", "/v1/billing/charges", json=charge))[0] == 201


async def test_spending_order_daily_then_free_then_paid(http: Any, fake: FakeBillingBackend) -> None:
    await call(http, "POST", "/v1/billing/credits/check", json=WHO)
    fake.grant(*WHO.values(), 1)
    charge = {**WHO, "amount_minor": 1, "currency": "USD", "description": "x"}
    seen = []
    for _ in range(14):
        status, body, _ = await call(http, "POST", "/v1/billing/charges", json=charge)
        view = fake.account(*WHO.values())
        seen.append(
            (
                status,
                view["daily_free_uses_remaining"],
                view["free_uses_remaining"],
                view["credits_remaining"],
            )
        )
    assert seen[0] == (201, 1, 10, 1)
    assert seen[1] == (201, 0, 10, 1)
    assert seen[11] == (201, 0, 0, 1)
    assert seen[12] == (201, 0, 0, 0)
    assert seen[13][0] == 402
    status, body, _ = await call(http, "POST", "/v1/billing/charges", json=charge)
    assert body == {"detail": "Insufficient credits. Balance: 0, Required: 1"}
    status, body, _ = await call(http, "POST", "/v1/billing/credits/check", json=WHO)
    assert (body["purchase_required"], body["purchase_price_minor"], body["purchase_uses"]) == (True, 500, 20)


async def test_duplicate_charge_key_is_409_with_the_existing_id(http: Any, fake: FakeBillingBackend) -> None:
    await call(http, "POST", "/v1/billing/credits/check", json=WHO)
    charge = {**WHO, "amount_minor": 1, "currency": "USD", "description": "x", "idempotency_key": "k1"}
    status, first, _ = await call(http, "POST", "/v1/billing/charges", json=charge)
    assert status == 201
    status, body, headers = await call(
        http, "POST", "/v1/billing/charges", json={**charge, "oauth_provider": "oauth:x"}
    )
    assert (status, body) == (409, {"detail": "Charge already exists"})  # global, not per account
    assert headers["X-Existing-Charge-ID"] == first["charge_id"]
    fake.duplicate_charges_as_201 = True
    status, again, _ = await call(http, "POST", "/v1/billing/charges", json=charge)
    assert (status, again["charge_id"]) == (201, first["charge_id"])


async def test_purchases_new_intent_no_ownership_and_credits_only_on_webhook(
    http: Any, fake: FakeBillingBackend
) -> None:
    status, body, _ = await call(http, "POST", "/v1/billing/purchases", json=WHO)
    assert status == 422  # customer_email is required
    buy = {**WHO, "customer_email": "u@example.com"}
    status, first, _ = await call(http, "POST", "/v1/billing/purchases", json=buy)
    assert status == 201
    assert first["client_secret"].startswith(first["payment_id"] + "_secret_")
    assert (first["amount_minor"], first["uses_purchased"], first["status"]) == (
        500,
        20,
        "requires_payment_method",
    )
    assert fake.account(*WHO.values())["free_uses_remaining"] == 3  # created by a purchase: 3, not 10
    fake.ledger.clock_offset += timedelta(seconds=2)
    _, second, _ = await call(http, "POST", "/v1/billing/purchases", json=buy)
    assert second["payment_id"] != first["payment_id"]
    # Anyone's key reads anyone's payment, client secret included.
    status, seen, _ = await call(http, "GET", f"/v1/billing/purchases/{first['payment_id']}/status")
    assert (status, seen["client_secret"]) == (200, first["client_secret"])
    fake.confirm_payment(first["payment_id"], webhook_delay=None)
    assert fake.account(*WHO.values())["credits_remaining"] == 0  # Stripe succeeded, no webhook yet
    assert fake.deliver_webhook(first["payment_id"])
    assert not fake.deliver_webhook(first["payment_id"])  # duplicate delivery credits once
    assert fake.account(*WHO.values())["credits_remaining"] == 20
    status, body, _ = await call(http, "GET", "/v1/billing/purchases/pi_nope/status")
    assert (status, body) == (404, {"detail": "Payment not found: pi_nope"})


async def test_injected_faults(http: Any, fake: FakeBillingBackend) -> None:
    fake.inject("error_500", endpoint="credits/check", times=1)
    async with http.post("/v1/billing/credits/check", json=WHO) as resp:
        assert (resp.status, resp.content_type, await resp.text()) == (
            500,
            "text/plain",
            "Internal Server Error",
        )
    assert (await call(http, "POST", "/v1/billing/credits/check", json=WHO))[0] == 200
    fake.inject("drop", endpoint="credits/check", times=1)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, "POST", "/v1/billing/credits/check", json=WHO)
    assert fake.calls["credits/check"] >= 3
