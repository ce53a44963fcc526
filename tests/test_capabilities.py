"""`GET /capabilities`: what the provider declares it offers, so a UI knows before anyone clicks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.client import BillingClient, NotFoundError
from ciris_billing_proxy.testing import TokenFactory

from .conftest import ClientFactory, make_config
from .default_paths import CAPABILITIES
from .providers import ShopProvider

NO_STORES = {"google_play": False, "apple_storekit": False, "charges": True, "products": []}
SIMPLE = {"provider": "simple", "purchases": False, "transactions": True, **NO_STORES}


async def test_simple_offers_history_but_no_purchases(billing_client: Any, tokens: TokenFactory) -> None:
    resp = await billing_client.get(CAPABILITIES, headers=tokens.headers())
    assert resp.status == 200
    assert await resp.json() == SIMPLE


async def test_ciris_offers_purchases_and_history(
    ciris_billing_config: BillingConfig, ciris_tokens: TokenFactory, make_client: ClientFactory
) -> None:
    client = await make_client(ciris_billing_config)
    resp = await client.get(CAPABILITIES, headers=ciris_tokens.headers())
    assert await resp.json() == {
        "provider": "ciris",
        "purchases": True,
        "transactions": True,
        "google_play": True,
        "apple_storekit": True,
        "charges": True,
        "products": ["web_search"],
    }


async def test_a_third_party_provider_declares_its_own(
    config: BillingConfig, tokens: TokenFactory, make_client: ClientFactory
) -> None:
    client = await make_client(config, provider=ShopProvider())
    resp = await client.get(CAPABILITIES, headers=tokens.headers())
    # ShopProvider declares purchases and inherits the default "no history".
    assert await resp.json() == {
        "provider": "shop",
        "purchases": True,
        "transactions": False,
        **NO_STORES,
    }


async def test_needs_a_token(billing_client: Any, tokens: TokenFactory) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, tokens.headers(ttl=-60)):
        resp = await billing_client.get(CAPABILITIES, headers=headers)
        assert resp.status == 401
        assert "detail" in await resp.json()


async def test_a_declaration_that_is_not_a_bool_is_a_503_naming_the_provider(
    config: BillingConfig,
    tokens: TokenFactory,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Confused(ShopProvider):
        name = "confused"

        @property
        def keeps_transactions(self) -> bool:
            return "yes"  # type: ignore[return-value]

    client = await make_client(config, provider=Confused())
    with caplog.at_level(logging.ERROR, "ciris_billing_proxy"):
        resp = await client.get(CAPABILITIES, headers=tokens.headers())
    assert resp.status == 503
    assert await resp.json() == {"detail": "Billing service unavailable"}
    assert "'confused' declared keeps_transactions as str; expected bool" in caplog.text


async def test_the_python_client_reads_them(billing_client: Any, tokens: TokenFactory) -> None:
    base = str(billing_client.make_url(""))
    async with BillingClient(base, token=tokens.token()) as billing:
        capabilities = await billing.capabilities()
    # The client reads an agent that sells no named packs as one with none (the route leaves it out).
    assert capabilities.model_dump() == {**SIMPLE, "low_balance_threshold": None, "packs": []}


async def test_the_client_names_an_agent_without_the_route(billing_client: Any, tokens: TokenFactory) -> None:
    # An agent older than the route: nothing is served at that prefix.
    base = str(billing_client.make_url(""))
    async with BillingClient(base, token=tokens.token(), prefix="/v1/api/older") as billing:
        with pytest.raises(NotFoundError):
            await billing.capabilities()


async def test_the_low_balance_threshold_reaches_the_ui(
    tmp_path: Path, tokens: TokenFactory, make_client: ClientFactory
) -> None:
    client = await make_client(make_config(tmp_path, low_balance_threshold=3))
    resp = await client.get(CAPABILITIES, headers=tokens.headers())
    assert await resp.json() == {**SIMPLE, "low_balance_threshold": 3}
