"""Per-product credits (tool credits, docs/tool-credits.md): the five tool routes with CIRIS's shapes,
status codes and tool-name rule, `@credit_gate(product=...)`, the `simple` provider's products on
SQLite and PostgreSQL, and the `ciris` provider against the fake backend's tool routes."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, credit_gate
from ciris_billing_proxy.client import AlreadyProcessedError, BillingClient, NotFoundError
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import agent_routes, who
from .conftest import ClientFactory, make_config
from .default_paths import CAPABILITIES, CREDITS
from .postgres import fetch
from .serving import login, serve

TOOLS = "/v1/api/tools"
SEARCH, IMAGE = "/v1/agent/search", "/v1/agent/image"
PRODUCTS = {"web_search": {"free_uses": 3, "price_minor": 2}, "image_gen": {"free_uses": 5}}


def tool_routes(app: web.Application) -> None:
    """A host with one gated tool per product; `?fail=1` makes the tool fail (its use is given back)."""

    async def tool(request: web.Request) -> web.Response:
        if request.query.get("fail"):
            return web.json_response({"detail": "search engine down"}, status=502)
        return web.json_response({"ok": True})

    app.router.add_post(SEARCH, credit_gate(product="web_search")(tool))
    app.router.add_post(IMAGE, credit_gate(product="image_gen")(tool))
    agent_routes(app)


def simple_config(tmp_path: Path, **overrides: Any) -> BillingConfig:
    return make_config(tmp_path, provider_options={"products": PRODUCTS, "free_uses": 2}, **overrides)


@pytest.fixture
async def simple(tmp_path: Path, make_client: ClientFactory) -> tuple[Any, dict[str, str]]:
    config = simple_config(tmp_path)
    return await make_client(config, host=tool_routes), TokenFactory(config).headers("ann")


async def test_the_tool_routes_answer_cirises_shapes(simple: tuple[Any, dict[str, str]]) -> None:
    client, auth = simple
    balance = await (await client.get(f"{TOOLS}/balance/web_search", headers=auth)).json()
    assert balance == {
        "product_type": "web_search",
        "free_remaining": 3,
        "paid_credits": 0,
        "total_available": 3,
        "price_minor": 2,
        "total_uses": 0,
    }
    every = await (await client.get(f"{TOOLS}/balance", headers=auth)).json()
    assert [b["product_type"] for b in every["balances"]] == ["web_search", "image_gen"]
    check = await (await client.get(f"{TOOLS}/check/image_gen", headers=auth)).json()
    assert check == {
        "has_credit": True,
        "product_type": "image_gen",
        "free_remaining": 5,
        "paid_credits": 0,
        "total_available": 5,
    }
    available = await (await client.get(f"{TOOLS}/available", headers=auth)).json()
    assert available["platform"] == "server"
    assert available["has_google_auth"] is False
    assert [(t["name"], t["cost"], t["available"]) for t in available["tools"]] == [
        ("web_search", 1.0, True),
        ("image_gen", 1.0, True),
    ]
    capabilities = await (await client.get(CAPABILITIES, headers=auth)).json()
    assert capabilities["products"] == ["web_search", "image_gen"]
    purchase = {"product_id": "web_search_10", "purchase_token": "gp-123456789", "tool_name": "web_search"}
    refused = await client.post(f"{TOOLS}/purchase", json=purchase, headers=auth)
    assert refused.status == 200  # simple redeems no store purchase: said as CIRIS's apps read it
    assert await refused.json() == {
        "success": False,
        "product_type": "web_search",
        "credits_added": 0,
        "new_balance": 0,
        "message": "Billing not enabled for this agent",
    }


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"{TOOLS}/balance/9lives", 400),
        (f"{TOOLS}/check/web-search", 400),
        (f"{TOOLS}/balance/{'a' * 65}", 400),
        (f"{TOOLS}/balance/{'a' * 64}", 404),
        (f"{TOOLS}/check/nope", 404),
        (f"{TOOLS}/balance/web_search/x", 404),
    ],
)
async def test_the_tool_name_rule_and_unknown_tools(
    simple: tuple[Any, dict[str, str]], path: str, status: int
) -> None:
    client, auth = simple
    resp = await client.get(path, headers=auth)
    assert resp.status == status
    detail = (await resp.json())["detail"]
    assert detail.startswith(
        {400: "Invalid tool name", 404: "Tool not found" if "/x" not in path else "Not"}[status]
    )


async def test_tool_routes_need_the_agents_token(simple: tuple[Any, dict[str, str]]) -> None:
    client, _ = simple
    for path in ("/balance", "/balance/web_search", "/check/web_search", "/available"):
        resp = await client.get(TOOLS + path)
        assert resp.status == 401
        assert "detail" in await resp.json()
    assert (await client.post(f"{TOOLS}/purchase", json={})).status == 401


async def test_the_product_gate_spends_that_product_only_and_gives_back_on_failure(
    simple: tuple[Any, dict[str, str]],
) -> None:
    client, auth = simple
    assert (await client.post(SEARCH, headers=auth, params={"fail": "1"})).status == 502
    statuses = [(await client.post(SEARCH, headers=auth)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 402]
    refused = await (await client.post(SEARCH, headers=auth)).json()
    assert refused["detail"]["error"] == "insufficient_credit"
    assert refused["detail"]["reason"] == "No web_search uses remaining"
    search = await (await client.get(f"{TOOLS}/balance/web_search", headers=auth)).json()
    assert (search["free_remaining"], search["total_uses"]) == (0, 3)
    image = await (await client.get(f"{TOOLS}/balance/image_gen", headers=auth)).json()
    assert (image["free_remaining"], image["total_uses"]) == (5, 0)
    credits = await (await client.get(CREDITS, headers=auth)).json()
    assert (credits["free_uses_remaining"], credits["total_uses"]) == (2, 0)  # interactions untouched
    transactions = await (await client.get("/v1/api/billing/transactions", headers=auth)).json()
    assert transactions["total_count"] == 0


async def test_concurrent_product_spends_never_overspend(simple: tuple[Any, dict[str, str]]) -> None:
    client, auth = simple
    results = await asyncio.gather(*(client.post(IMAGE, headers=auth) for _ in range(20)))
    assert sorted(r.status for r in results) == [200] * 5 + [402] * 15


def test_credit_gate_takes_both_forms_and_checks_the_product_name() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    assert callable(credit_gate(handler))
    assert callable(credit_gate(product="web_search")(handler))
    assert callable(credit_gate()(handler))
    with pytest.raises(ValueError, match="product"):
        credit_gate(product="web search")


async def test_a_gate_on_a_product_the_provider_does_not_sell_is_a_404(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    config = make_config(tmp_path)  # simple without products
    client = await make_client(config, host=tool_routes)
    resp = await client.post(SEARCH, headers=TokenFactory(config).headers())
    assert resp.status == 404
    assert await resp.json() == {"detail": "Tool not found: web_search"}


async def test_the_tools_prefix_is_configurable(tmp_path: Path, make_client: ClientFactory) -> None:
    config = simple_config(tmp_path, tools_prefix="/agent/tools")
    client = await make_client(config)
    auth = TokenFactory(config).headers()
    assert (await client.get("/agent/tools/balance/web_search", headers=auth)).status == 200
    assert (await client.get(f"{TOOLS}/balance/web_search", headers=auth)).status == 404


async def test_two_apps_on_postgresql_spend_exactly_the_products_uses(
    pg_url: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    """200 concurrent gated calls of one product over two apps (two providers, two pools) on one
    PostgreSQL database take exactly its uses; the other product and the interactions are untouched."""
    products = {"web_search": {"free_uses": 50}, "image_gen": {"free_uses": 7}}
    config = make_config(tmp_path, database_url=pg_url, provider_options={"products": products})
    a, b = await make_client(config, host=tool_routes), await make_client(config, host=tool_routes)
    auth = TokenFactory(config).headers("ann")

    async def burst(failing: bool) -> list[int]:
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).post(
                    SEARCH, headers=auth, params={"fail": "1"} if failing and i % 10 == 3 else {}
                )
                for i in range(200)
            )
        )
        return [r.status for r in results]

    async def search_balance(app: Any) -> tuple[int, int]:
        search = await (await app.get(f"{TOOLS}/balance/web_search", headers=auth)).json()
        return search["free_remaining"], search["total_uses"]

    # Failing calls give their use back: exactly the successful calls have spent, whatever the timing.
    first = await burst(failing=True)
    assert first.count(502) >= 1  # some failing calls got a use (the others were refused first)
    assert first.count(200) + first.count(402) + first.count(502) == 200
    assert await search_balance(a) == (50 - first.count(200), first.count(200))
    # Then the rest: every use there was is spent, and not one more.
    second = await burst(failing=False)
    assert first.count(200) + second.count(200) == 50
    for app in (a, b):
        assert await search_balance(app) == (0, 50)
        image = await (await app.get(f"{TOOLS}/balance/image_gen", headers=auth)).json()
        assert (image["free_remaining"], image["total_uses"]) == (7, 0)
        credits = await (await app.get(CREDITS, headers=auth)).json()
        assert credits["total_uses"] == 0
    assert sorted(await fetch(pg_url, "SELECT used FROM credit_accounts")) == [(50,)]


# --- the ciris provider against the fake backend's tool routes --------------------------------------


@pytest.fixture
async def ciris_client(ciris_billing_config: BillingConfig, make_client: ClientFactory) -> Any:
    return await make_client(ciris_billing_config, host=tool_routes)


async def test_ciris_reads_and_charges_through_the_backends_tool_routes(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    fake, auth = ciris_fake_backend, ciris_tokens.headers("ann")
    balance = await (await ciris_client.get(f"{TOOLS}/balance/web_search", headers=auth)).json()
    assert (balance["free_remaining"], balance["paid_credits"], balance["price_minor"]) == (10, 0, 1)
    assert (await ciris_client.post(SEARCH, headers=auth)).status == 200
    assert fake.tool_inventory(*who("ann"), "web_search")["free_remaining"] == 9
    check = await (await ciris_client.get(f"{TOOLS}/check/web_search", headers=auth)).json()
    assert (check["has_credit"], check["total_available"]) == (True, 9)
    every = await (await ciris_client.get(f"{TOOLS}/balance", headers=auth)).json()
    assert [b["product_type"] for b in every["balances"]] == ["web_search"]
    charges = [b for e, b, _ in fake.received if e == "tools/charge"]
    assert charges
    assert (charges[0]["oauth_provider"], charges[0]["external_id"]) == who("ann")
    assert charges[0]["idempotency_key"].startswith("test-agent-tool-web_search-")
    # The interaction credits are untouched.
    assert fake.account(*who("ann"))["total_uses"] == 0
    # Paid tool credits after the free ones, then the main pool, then 402.
    with fake.ledger.lock:
        fake.tools.inventories[(who("ann"), "web_search")].free_remaining = 0
    fake.grant_tool_credits(*who("ann"), "web_search", 1)
    fake.grant(*who("ann"), 1)
    assert [(await ciris_client.post(SEARCH, headers=auth)).status for _ in range(3)] == [200, 200, 402]
    assert fake.account(*who("ann"))["credits_remaining"] == 0  # the main pool paid the second
    assert (await ciris_client.get(f"{TOOLS}/balance/image_gen", headers=auth)).status == 404


async def test_ciris_tool_charges_are_retried_with_one_key_and_faults_are_503(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    fake, auth = ciris_fake_backend, ciris_tokens.headers("bob")
    fake.inject("rate_limit_503", endpoint="tools/charge", times=1)
    assert (await ciris_client.post(SEARCH, headers=auth)).status == 200
    keys = {b["idempotency_key"] for e, b, _ in fake.received if e == "tools/charge"}
    assert len(keys) == 1
    assert fake.tool_inventory(*who("bob"), "web_search")["total_uses"] == 1  # charged once
    fake.inject("error_500", endpoint="tools/balance")
    resp = await ciris_client.get(f"{TOOLS}/balance/web_search", headers=auth)
    assert resp.status == 503
    assert await resp.json() == {"detail": "Billing service unavailable"}
    fake.clear_faults()
    fake.inject("bad_json", endpoint="tools/check")
    assert (await ciris_client.get(f"{TOOLS}/check/web_search", headers=auth)).status == 503


async def test_a_tool_purchase_verified_twice_concurrently_credits_once(
    ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, auth = ciris_fake_backend, ciris_tokens.headers("cy")
    token = f"gp-{secrets.token_hex(16)}"
    purchase = {"product_id": "web_search_10", "purchase_token": token, "tool_name": "web_search"}
    with caplog.at_level(logging.DEBUG):
        replies = await asyncio.gather(
            *(ciris_client.post(f"{TOOLS}/purchase", json=purchase, headers=auth) for _ in range(2))
        )
    assert sorted(r.status for r in replies) == [200, 409]
    ok = next(r for r in replies if r.status == 200)
    assert await ok.json() == {
        "success": True,
        "product_type": "web_search",
        "credits_added": 10,
        "new_balance": 20,
        "message": "Added 10 web_search credits",
    }
    again = next(r for r in replies if r.status == 409)
    assert await again.json() == {"detail": "Purchase already processed"}
    assert fake.tool_inventory(*who("cy"), "web_search")["paid_credits"] == 10
    assert token not in caplog.text
    bad = {**purchase, "purchase_token": "invalid-" + secrets.token_hex(8)}
    refused = await ciris_client.post(f"{TOOLS}/purchase", json=bad, headers=auth)
    assert refused.status == 400
    assert await refused.json() == {"detail": "Purchase not valid: state=1"}
    for body, status in (({**purchase, "tool_name": "web-search"}, 400), ({"product_id": 5}, 422)):
        assert (await ciris_client.post(f"{TOOLS}/purchase", json=body, headers=auth)).status == status


# --- the demo agent and the Python client -----------------------------------------------------------


async def test_the_demo_agent_gates_its_tool_route_per_product(tmp_path: Path) -> None:
    """`serve` (simple): `web_search` with 10 free uses by default, `POST /v1/agent/tools/{product}`."""
    with serve(["--user", "ann:pw:ann@example.com"], tmp_path) as server:
        async with aiohttp.ClientSession() as session:
            token = await login(session, server.url, "ann", "pw")
            auth = {"Authorization": f"Bearer {token}"}
            statuses = []
            for product in ("web_search", "web_search", "image_gen", "9lives"):
                async with session.post(f"{server.url}/v1/agent/tools/{product}", headers=auth) as resp:
                    statuses.append(resp.status)
            assert statuses == [200, 200, 404, 400]
        async with BillingClient(server.url, token=token) as billing:
            balance = await billing.get_tool_balance("web_search")
            assert (balance.free_remaining, balance.total_uses) == (8, 2)
            assert [b.product_type for b in (await billing.get_tool_balances()).balances] == ["web_search"]
            assert (await billing.check_tool("web_search")).has_credit is True
            available = await billing.get_available_tools()
            assert available.tools[0].description == "Search the web for current information"
            with pytest.raises(NotFoundError):
                await billing.get_tool_balance("image_gen")
            refused = await billing.purchase_tool("web_search_10", "gp-1234567890", "web_search")
            assert (refused.success, refused.message) == (False, "Billing not enabled for this agent")
            assert (await billing.get_credits()).total_uses == 0


async def test_the_python_client_redeems_a_tool_purchase_once(
    ciris_client: Any, ciris_tokens: TokenFactory
) -> None:
    base = str(ciris_client.make_url(""))
    async with BillingClient(base, token=ciris_tokens.token("dee")) as billing:
        first = await billing.purchase_tool("web_search_50", "gp-" + secrets.token_hex(8), "web_search")
        assert (first.success, first.credits_added, first.new_balance) == (True, 50, 60)
        token = "gp-" + secrets.token_hex(8)
        assert (await billing.purchase_tool("web_search_10", token, "web_search")).credits_added == 10
        with pytest.raises(AlreadyProcessedError):
            await billing.purchase_tool("web_search_10", token, "web_search")
        assert (await billing.get_tool_balance("web_search")).paid_credits == 60
