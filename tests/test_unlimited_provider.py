"""The `unlimited` provider (bring your own key): every user has credit, nothing is charged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import credit_gate
from ciris_billing_proxy.providers import ProviderContext, create_provider, installed_providers
from ciris_billing_proxy.providers.unlimited import UnlimitedProvider
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.testing.conformance import ProviderContract

from .conftest import ClientFactory, make_config
from .default_paths import CAPABILITIES, CREDITS, GOOGLE_PLAY, INITIATE

INTERACT = "/v1/agent/interact"


def host(app: web.Application) -> None:
    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_post(INTERACT, interact)


def test_unlimited_is_registered_through_the_package_entry_point() -> None:
    [ep] = installed_providers()["unlimited"]
    assert ep.dist is not None
    assert ep.dist.name == "ciris-billing-proxy"
    assert isinstance(create_provider("unlimited", ProviderContext()), UnlimitedProvider)


async def test_every_user_has_credit_that_never_goes_down(tmp_path: Path, make_client: ClientFactory) -> None:
    config = make_config(tmp_path, provider="unlimited")
    client = await make_client(config, host=host)
    auth = TokenFactory(config).headers("ann")
    before = await (await client.get(CREDITS, headers=auth)).json()
    assert before == {
        "has_credit": True,
        "credits_remaining": 999,
        "free_uses_remaining": 999,
        "total_uses": 0,
        "plan_name": "unlimited",
        "purchase_required": False,
        "purchase_options": None,
    }
    for _ in range(5):
        assert (await client.post(INTERACT, headers=auth)).status == 200
    assert await (await client.get(CREDITS, headers=auth)).json() == before
    capabilities = await (await client.get(CAPABILITIES, headers=auth)).json()
    assert capabilities == {
        "provider": "unlimited",
        "purchases": False,
        "transactions": False,
        "google_play": False,
        "apple_storekit": False,
        "charges": False,
    } | {k: v for k, v in capabilities.items() if k == "products"}
    assert (await client.post(INITIATE, json={}, headers=auth)).status == 403
    purchase = {"purchase_token": "gp-1234567890", "product_id": "credits_100", "package_name": "a.b"}
    store = await (await client.post(GOOGLE_PLAY, json=purchase, headers=auth)).json()
    assert store["success"] is False


class TestUnlimitedConforms(ProviderContract):
    charges_uses = False

    @pytest.fixture
    async def provider(self) -> AsyncIterator[Any]:
        provider = UnlimitedProvider()
        await provider.start()
        yield provider
        await provider.stop()
