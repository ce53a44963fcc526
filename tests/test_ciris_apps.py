"""What the CIRIS apps rely on (docs/ciris-apps.md), against the `ciris` provider and the fake
backend over real HTTP: the balance both UIs add up, and the apps' other expectations."""

from __future__ import annotations

from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import INTERACT, agent_routes, who
from .conftest import ClientFactory
from .default_paths import CREDITS


@pytest.fixture
async def ciris_client(ciris_billing_config: BillingConfig, make_client: ClientFactory) -> Any:
    return await make_client(ciris_billing_config, host=agent_routes)


def seed_ui_sum(body: dict[str, Any]) -> int:
    """What the seed's UI shows (docs/billing-api.md)."""
    return int(body["credits_remaining"]) + int(body["free_uses_remaining"])


def android_sum(body: dict[str, Any]) -> int:
    """What the Android billing screen shows (`BillingViewModel.kt`); an absent field is 0."""
    return seed_ui_sum(body) + int(body.get("daily_free_uses_remaining") or 0)


def true_uses_left(fake: FakeBillingBackend, user: str) -> int:
    account = fake.account(*who(user))
    return int(
        account["credits_remaining"] + account["free_uses_remaining"] + account["daily_free_uses_remaining"]
    )


async def test_both_sums_show_the_true_uses_left_in_every_state(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    fake = ciris_fake_backend
    auth = ciris_tokens.headers("ann")

    async def credits() -> dict[str, Any]:
        response = await ciris_client.get(CREDITS, headers=auth)
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body

    # One-time and daily uses left (10 + 2), then one-time, daily and paid uses.
    fresh = await credits()
    assert seed_ui_sum(fresh) == android_sum(fresh) == true_uses_left(fake, "ann") == 12
    fake.grant(*who("ann"), 3)
    assert (await ciris_client.post(INTERACT, json={}, headers=auth)).status == 200
    mixed = await credits()
    assert seed_ui_sum(mixed) == android_sum(mixed) == true_uses_left(fake, "ann") == 14

    # Only daily uses left: every rule of the seven fields still holds.
    with fake.ledger.lock:
        fake.ledger.accounts[who("ann")].free_uses_remaining = 0
        fake.ledger.accounts[who("ann")].paid_credits = 0
        fake.ledger.accounts[who("ann")].daily_free_uses_remaining = 2
    assert (await ciris_client.post(INTERACT, json={}, headers=auth)).status == 200  # takes a daily use
    daily = await credits()
    assert seed_ui_sum(daily) == android_sum(daily) == true_uses_left(fake, "ann") == 1
    assert (daily["has_credit"], daily["purchase_required"]) == (True, False)
    assert daily["free_uses_remaining"] == daily["daily_free_uses_included"] == 1

    # Nothing left.
    assert (await ciris_client.post(INTERACT, json={}, headers=auth)).status == 200
    assert (await ciris_client.post(INTERACT, json={}, headers=auth)).status == 402
    empty = await credits()
    assert seed_ui_sum(empty) == android_sum(empty) == true_uses_left(fake, "ann") == 0
    assert (empty["has_credit"], empty["purchase_required"]) == (False, True)
