"""A provider's own routes (`CreditProvider.routes`): added under the prefix, public or behind the token,
in the OpenAPI document, with the package's JSON errors; a bad declaration fails at startup."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from aiohttp import web

from ciris_billing_proxy import (
    BillingConfig,
    ConfigError,
    InvalidRequest,
    Operation,
    ProviderRoute,
    get_identity,
    setup_billing,
)
from ciris_billing_proxy.testing import TokenFactory

from .conftest import ClientFactory
from .providers import ShopProvider

PREFIX = "/v1/api/billing"

HOOK = Operation(
    "shopHook", "POST", "/shop/hook", "A payment system's webhook.", None, {400: "bad"}, "shop", bearer=False
)
MINE = Operation("shopMine", "GET", "/shop/mine", "Who asks.", None, {}, "shop")


class RoutedShop(ShopProvider):
    def __init__(self, routes: Sequence[ProviderRoute] | None = None) -> None:
        super().__init__()
        self.hooks: list[bytes] = []
        self._routes = routes

    def routes(self) -> Sequence[ProviderRoute]:
        if self._routes is not None:
            return self._routes
        return (ProviderRoute(HOOK, self.hook), ProviderRoute(MINE, self.mine))

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body == b"bad":
            raise InvalidRequest("Bad hook")
        self.hooks.append(body)
        return web.json_response({"received": True})

    async def mine(self, request: web.Request) -> web.Response:
        return web.json_response({"user_id": get_identity(request).user_id})


@pytest.mark.parametrize("subapp", [True, False])
async def test_public_and_authenticated_provider_routes(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory, subapp: bool
) -> None:
    provider = RoutedShop()
    client = await make_client(config, provider=provider, subapp=subapp)

    resp = await client.post(PREFIX + "/shop/hook", data=b"event")
    assert resp.status == 200, await resp.text()
    assert provider.hooks == [b"event"]
    resp = await client.post(PREFIX + "/shop/hook", data=b"bad")
    assert (resp.status, await resp.json()) == (400, {"detail": "Bad hook"})

    resp = await client.get(PREFIX + "/shop/mine")
    assert resp.status == 401
    assert (await resp.json())["detail"]
    resp = await client.get(PREFIX + "/shop/mine", headers=tokens.headers("ann"))
    assert (resp.status, await resp.json()) == (200, {"user_id": "ann"})
    resp = await client.get(PREFIX + "/shop/hook", headers=tokens.headers("ann"))
    assert resp.status == 405

    document = await (await client.get(PREFIX + "/openapi.json")).json()
    assert document["paths"][PREFIX + "/shop/hook"]["post"]["operationId"] == "shopHook"
    assert "security" not in document["paths"][PREFIX + "/shop/hook"]["post"] or (
        document["paths"][PREFIX + "/shop/hook"]["post"]["security"] == []
    )
    assert document["paths"][PREFIX + "/shop/mine"]["get"]["operationId"] == "shopMine"


@pytest.mark.parametrize(
    "path",
    ["/credits/more", "/purchase/x", "/shop", "shop/hook", "/Shop/hook", "/tools/x", "/ui/x", "/shop/a b"],
)
def test_a_provider_route_outside_its_own_segment_fails_at_startup(tmp_path: Path, path: str) -> None:
    op = Operation("bad", "POST", path, "", None, {}, "shop", bearer=False)
    provider = RoutedShop([ProviderRoute(op, RoutedShop().hook)])
    with pytest.raises(ConfigError, match="route path"):
        setup_billing(web.Application(), _config(tmp_path), provider=provider, environ={})


def test_the_same_provider_route_twice_fails_at_startup(tmp_path: Path) -> None:
    shop = RoutedShop()
    provider = RoutedShop([ProviderRoute(HOOK, shop.hook), ProviderRoute(HOOK, shop.hook)])
    with pytest.raises(ConfigError, match="twice"):
        setup_billing(web.Application(), _config(tmp_path), provider=provider, environ={})


def _config(tmp_path: Path) -> BillingConfig:
    from .conftest import make_config

    return make_config(tmp_path)
