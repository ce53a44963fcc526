"""`cors_origins`: pages on the listed origins call the billing routes over real HTTP (preflight, the
reply's CORS headers, errors included); other origins and agents without the setting get no CORS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.config import ConfigError
from ciris_billing_proxy.testing import TokenFactory

from .conftest import SECRET, ClientFactory, make_config
from .default_paths import BILLING, CREDITS, INITIATE

SHOP = "http://shop.example:5173"
OTHER = "https://evil.example"


def preflight(origin: str, method: str = "GET", headers: str = "authorization") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


@pytest.fixture
async def shop_client(tmp_path: Path, make_client: ClientFactory) -> Any:
    return await make_client(make_config(tmp_path, cors_origins=(SHOP,)))


@pytest.mark.parametrize("subapp", [True, False])
async def test_an_allowed_origin_gets_a_preflight_and_readable_replies(
    tmp_path: Path, make_client: ClientFactory, subapp: bool
) -> None:
    config = make_config(tmp_path, cors_origins=(SHOP,))
    client = await make_client(config, subapp=subapp)
    auth = TokenFactory(config).headers("ann")
    resp = await client.options(CREDITS, headers=preflight(SHOP))
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == SHOP
    assert resp.headers["Access-Control-Allow-Headers"].lower() == "authorization"
    assert resp.headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Allow-Credentials" not in resp.headers  # bearer tokens, not cookies

    purchase = preflight(SHOP, "POST", "authorization,content-type,idempotency-key")
    resp = await client.options(INITIATE, headers=purchase)
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Methods"] == "POST"

    resp = await client.get(CREDITS, headers={**auth, "Origin": SHOP})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == SHOP
    assert resp.headers["Access-Control-Expose-Headers"] == "Retry-After"
    assert "Origin" in resp.headers.getall("Vary")

    resp = await client.get(CREDITS, headers={"Origin": SHOP})  # an error reply is readable too
    assert resp.status == 401
    assert resp.headers["Access-Control-Allow-Origin"] == SHOP
    assert (await resp.json())["detail"] == "Not authenticated"
    assert "Origin" in resp.headers.getall("Vary")

    # Labelled by the billing middleware: no reply hook, which would cost every reply.
    match = await client.app.router.resolve(make_mocked_request("GET", CREDITS))
    for app in (client.app, *match.apps):
        assert len(app.on_response_prepare) == 0


async def test_another_origin_is_refused_and_gets_no_cors_headers(
    shop_client: Any, tokens: TokenFactory
) -> None:
    resp = await shop_client.options(CREDITS, headers=preflight(OTHER))
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "detail" in await resp.json()  # JSON, like every error under the prefix

    resp = await shop_client.get(CREDITS, headers={**tokens.headers("ann"), "Origin": OTHER})
    assert resp.status == 200  # answered, but the browser keeps it from the page
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Origin" in resp.headers.getall("Vary")


async def test_a_header_outside_the_list_is_refused(shop_client: Any) -> None:
    resp = await shop_client.options(CREDITS, headers=preflight(SHOP, headers="authorization,x-secret"))
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_same_origin_replies_are_unchanged_but_vary(shop_client: Any, tokens: TokenFactory) -> None:
    resp = await shop_client.get(CREDITS, headers=tokens.headers("ann"))
    assert resp.status == 200
    assert not any(name.startswith("Access-Control-") for name in resp.headers)
    assert resp.headers.getall("Vary") == ["Origin"]


async def test_the_ui_files_keep_their_own_any_origin_header(shop_client: Any) -> None:
    resp = await shop_client.get(f"{BILLING}/ui/billing.js", headers={"Origin": OTHER})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_any_origin_with_a_star(tmp_path: Path, make_client: ClientFactory) -> None:
    client = await make_client(make_config(tmp_path, cors_origins=("*",)))
    resp = await client.options(CREDITS, headers=preflight(OTHER))
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == OTHER


async def test_without_origins_nothing_is_installed(tmp_path: Path, make_client: ClientFactory) -> None:
    client = await make_client(make_config(tmp_path))
    resp = await client.options(CREDITS, headers=preflight(SHOP))
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.get(CREDITS, headers={"Origin": SHOP})
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Vary" not in resp.headers
    match = await client.app.router.resolve(make_mocked_request("GET", CREDITS))
    for app in (client.app, *match.apps):  # the host, and the billing sub-app that serves the route
        assert len(app.on_response_prepare) == 0  # not even a hook: same-origin requests pay nothing


@pytest.mark.parametrize(
    "origin",
    ["https://shop.example/", "https://shop.example/path", "HTTPS://Shop.example", "shop.example", "null"],
)
def test_an_origin_that_can_never_match_is_refused_at_startup(origin: str) -> None:
    env = {"CIRIS_JWT_SECRET": SECRET, "CIRIS_BILLING_CORS_ORIGINS": f"{SHOP}, {origin}"}
    with pytest.raises(ConfigError, match="cors_origins"):
        BillingConfig.from_env(env)


def test_origins_from_the_environment() -> None:
    env = {"CIRIS_JWT_SECRET": SECRET, "CIRIS_BILLING_CORS_ORIGINS": f"{SHOP}, http://[::1]:8080"}
    assert BillingConfig.from_env(env).cors_origins == (SHOP, "http://[::1]:8080")
