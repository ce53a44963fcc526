"""GET /v1/api/billing/transactions: pagination, bounds, isolation, for both providers."""

from __future__ import annotations

from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig, Identity
from ciris_billing_proxy.client import BillingClient
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import agent_routes
from .conftest import ClientFactory
from .default_paths import INITIATE, TRANSACTIONS

FIELDS = {"transaction_id", "type", "amount_minor", "currency", "description", "created_at", "balance_after"}


async def test_simple_lists_uses_and_give_backs_newest_first(
    billing_client: Any, tokens: TokenFactory
) -> None:
    service = billing_client.app[SERVICE_KEY]
    ann = Identity("ann", "local", "OBSERVER")
    for i in range(5):
        await service.spend(ann, f"k{i}")
    await service.give_back(ann, "k4")
    page = await (await billing_client.get(TRANSACTIONS, headers=tokens.headers("ann"))).json()
    assert (page["total_count"], page["has_more"]) == (6, False)
    assert [t["type"] for t in page["transactions"]] == [
        "credit",
        "charge",
        "charge",
        "charge",
        "charge",
        "charge",
    ]
    # The ledger says what each line is (additive: docs/compatibility.md).
    assert all(set(t) == FIELDS | {"transaction_type"} for t in page["transactions"])
    assert [t["transaction_type"] for t in page["transactions"][:2]] == ["give_back", "spend"]
    assert [t["balance_after"] for t in page["transactions"][:2]] == [6, 5]
    assert page["transactions"][1]["amount_minor"] == -1

    first = await (
        await billing_client.get(
            TRANSACTIONS, params={"limit": "2", "offset": "0"}, headers=tokens.headers("ann")
        )
    ).json()
    rest = await (
        await billing_client.get(
            TRANSACTIONS, params={"limit": "2", "offset": "4"}, headers=tokens.headers("ann")
        )
    ).json()
    assert (len(first["transactions"]), first["has_more"], first["total_count"]) == (2, True, 6)
    assert (len(rest["transactions"]), rest["has_more"]) == (2, False)
    past = await (
        await billing_client.get(TRANSACTIONS, params={"offset": "50"}, headers=tokens.headers("ann"))
    ).json()
    assert (past["transactions"], past["total_count"], past["has_more"]) == ([], 6, False)


async def test_users_only_see_their_own(billing_client: Any, tokens: TokenFactory) -> None:
    await billing_client.app[SERVICE_KEY].spend(Identity("ann", "local", "OBSERVER"), "k")
    bob = await (await billing_client.get(TRANSACTIONS, headers=tokens.headers("bob"))).json()
    assert bob == {"transactions": [], "total_count": 0, "has_more": False}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "-1"},
        {"limit": "abc"},
        {"limit": "1.5"},
        {"offset": "-1"},
        {"offset": "x"},
        {"limit": " 5"},
        {"limit": "9" * 30},
    ],
)
async def test_bounds_are_refused_not_clamped(
    billing_client: Any, tokens: TokenFactory, params: dict[str, str]
) -> None:
    resp = await billing_client.get(TRANSACTIONS, params=params, headers=tokens.headers())
    assert resp.status == 422
    assert "must be a whole number" in (await resp.json())["detail"]


async def test_needs_a_token(billing_client: Any) -> None:
    assert (await billing_client.get(TRANSACTIONS)).status == 401


async def test_ciris_maps_the_backend_listing(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    client = await make_client(ciris_billing_config, host=agent_routes)
    ann, bob = ciris_tokens.headers("ann"), ciris_tokens.headers("bob")
    for _ in range(3):
        assert (await client.post("/v1/agent/interact", json={}, headers=ann)).status == 200
    page = await (await client.get(TRANSACTIONS, params={"limit": "2"}, headers=ann)).json()
    assert (page["total_count"], page["has_more"], len(page["transactions"])) == (3, True, 2)
    assert all(set(t) >= FIELDS for t in page["transactions"])
    assert all(t["type"] == "charge" for t in page["transactions"])
    assert ciris_fake_backend.calls["transactions"] == 1
    assert (await (await client.get(TRANSACTIONS, headers=bob)).json())["total_count"] == 0


@pytest.mark.parametrize(
    ("offset", "ok"), [("0000000000005", True), ("1000000000", True), ("1000000001", False)]
)
async def test_offset_limits_are_stated(
    billing_client: Any, tokens: TokenFactory, offset: str, ok: bool
) -> None:
    resp = await billing_client.get(TRANSACTIONS, params={"offset": offset}, headers=tokens.headers())
    assert resp.status == (200 if ok else 422)
    if not ok:
        assert (await resp.json())[
            "detail"
        ] == "Invalid request: offset must be a whole number from 0 to 1000000000"


async def test_ciris_listing_with_credits_paging_and_clean_descriptions(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    client = await make_client(ciris_billing_config, host=agent_routes)
    ann = ciris_tokens.headers("ann", email="ann@example.com")
    for _ in range(2):
        assert (await client.post("/v1/agent/interact", json={}, headers=ann)).status == 200
    purchase = await (await client.post(INITIATE, json={}, headers=ann)).json()
    ciris_fake_backend.confirm_payment(purchase["payment_id"])
    first = await (await client.get(TRANSACTIONS, params={"limit": "1"}, headers=ann)).json()
    second = await (await client.get(TRANSACTIONS, params={"limit": "2", "offset": "1"}, headers=ann)).json()
    assert (first["total_count"], first["has_more"], second["has_more"]) == (3, True, False)
    credit = first["transactions"][0]
    assert (credit["type"], credit["amount_minor"], credit["balance_after"]) == ("credit", 20, 20)
    charges = second["transactions"]
    assert [(t["type"], t["amount_minor"], t["description"]) for t in charges] == [
        ("charge", -1, "Agent interaction")
    ] * 2  # the request key the proxy adds for itself is not shown


async def test_ciris_passes_on_the_backends_transaction_extras(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    """As CIRIS does: `transaction_type`, `external_transaction_id` and `metadata` (the apps show them)."""
    client = await make_client(ciris_billing_config, host=agent_routes)
    ann = ciris_tokens.headers("ann", email="ann@example.com")
    assert (await client.post("/v1/agent/interact", json={}, headers=ann)).status == 200
    purchase = await (await client.post(INITIATE, json={}, headers=ann)).json()
    ciris_fake_backend.confirm_payment(purchase["payment_id"])
    base = str(client.make_url("/"))
    async with BillingClient(base, token=ann["Authorization"].removeprefix("Bearer ")) as billing:
        credit, charge = (await billing.get_transactions()).transactions
    assert (credit.transaction_type, credit.external_transaction_id) == ("purchase", purchase["payment_id"])
    assert charge.metadata is not None
    assert charge.metadata["agent_id"] == "test-agent"
    assert charge.transaction_type is None  # the backend has none for charges: left out, not null
    raw = await (await client.get(TRANSACTIONS, headers=ann)).json()
    assert "transaction_type" not in raw["transactions"][1]


async def test_ciris_backend_without_a_listing_is_an_empty_history(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    client = await make_client(ciris_billing_config)
    ciris_fake_backend.inject("not_found", endpoint="transactions")
    resp = await client.get(TRANSACTIONS, headers=ciris_tokens.headers("old"))
    assert (resp.status, await resp.json()) == (
        200,
        {"transactions": [], "total_count": 0, "has_more": False},
    )
