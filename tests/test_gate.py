"""The credit gate on a host handler: atomic spend, give-back on failure, 402/503, bypass roles."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, credit_gate
from ciris_billing_proxy.keys import SPEND_KEY, SPENT_STATUS_KEY
from ciris_billing_proxy.testing import TokenFactory

from .conftest import ClientFactory, make_config
from .default_paths import CREDITS
from .providers import BrokenProvider, ShopProvider


def _agent(app: web.Application) -> None:
    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("raise"):
            raise RuntimeError("handler bug")
        if body.get("http_error"):
            raise web.HTTPBadRequest(text="bad")
        if body.get("answer_500"):
            return web.json_response({"detail": "model down"}, status=500)
        if body.get("slow"):
            await asyncio.sleep(0.05)
        spent = request.get(SPENT_STATUS_KEY)
        left = None if spent is None else spent.free_uses_remaining
        return web.json_response({"ok": True, "key": request.get(SPEND_KEY), "left": left})

    app.router.add_post("/v1/agent/interact", interact)


async def _remaining(client: Any, headers: dict[str, str]) -> int:
    body = await (await client.get(CREDITS, headers=headers)).json()
    return int(body["free_uses_remaining"] + body["credits_remaining"])


async def test_fifty_concurrent_calls_with_ten_free_uses(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, host=_agent)
    headers = tokens.headers("alice")
    results = await asyncio.gather(
        *(client.post("/v1/agent/interact", json={"slow": True}, headers=headers) for _ in range(50))
    )
    statuses = sorted(r.status for r in results)
    assert statuses.count(200) == 10
    assert statuses.count(402) == 40
    denied = next(r for r in results if r.status == 402)
    body = await denied.json()
    assert body["detail"]["error"] == "insufficient_credit"
    assert body["detail"]["message"]
    assert body["detail"]["reason"] == "No free uses remaining"
    credits = await (await client.get(CREDITS, headers=headers)).json()
    assert credits["free_uses_remaining"] == 0
    assert credits["total_uses"] == 10
    assert credits["has_credit"] is False
    assert credits["purchase_required"] is False
    assert credits["purchase_options"] is None
    assert credits["reason"] == "No free uses remaining"


async def test_each_gated_call_sees_the_credit_its_own_spend_left(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, host=_agent)
    headers = tokens.headers("alice")
    results = await asyncio.gather(
        *(client.post("/v1/agent/interact", json={"slow": True}, headers=headers) for _ in range(12))
    )
    left = sorted([(await r.json())["left"] for r in results if r.status == 200])
    assert left == list(range(10))  # ten spends, each told what its own transaction left
    assert sorted(r.status for r in results).count(402) == 2


async def test_the_ui_sees_what_the_gate_spends_at_once(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, host=_agent)
    headers = tokens.headers()
    assert await _remaining(client, headers) == 10  # now cached
    assert (await client.post("/v1/agent/interact", json={}, headers=headers)).status == 200
    assert await _remaining(client, headers) == 9


@pytest.mark.parametrize(
    ("body", "status"), [({"raise": True}, 500), ({"http_error": True}, 400), ({"answer_500": True}, 500)]
)
async def test_a_failed_interaction_gives_the_use_back(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory, body: dict[str, Any], status: int
) -> None:
    client = await make_client(config, host=_agent)
    headers = tokens.headers()
    resp = await client.post("/v1/agent/interact", json=body, headers=headers)
    assert resp.status == status
    assert await _remaining(client, headers) == 10


async def test_each_request_spends_under_its_own_key(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, host=_agent)
    headers = tokens.headers()
    keys = {
        (await (await client.post("/v1/agent/interact", json={}, headers=headers)).json())["key"]
        for _ in range(3)
    }
    assert len(keys) == 3
    assert await _remaining(client, headers) == 7


async def test_gate_needs_a_token(make_client: ClientFactory, config: BillingConfig) -> None:
    client = await make_client(config, host=_agent)
    resp = await client.post("/v1/agent/interact", json={})
    assert resp.status == 401
    assert await resp.json() == {"detail": "Not authenticated"}


async def test_provider_failure_is_503(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, provider=BrokenProvider(), host=_agent)
    resp = await client.post("/v1/agent/interact", json={}, headers=tokens.headers())
    assert resp.status == 503
    assert await resp.json() == {"detail": "Credit provider unavailable"}


async def test_bypass_roles_are_off_by_default_and_configurable(
    make_client: ClientFactory, tmp_path: Path, tokens: TokenFactory
) -> None:
    provider = ShopProvider(credits=0)
    client = await make_client(make_config(tmp_path), provider=provider, host=_agent)
    admin = tokens.headers(role="ADMIN")
    assert (await client.post("/v1/agent/interact", json={}, headers=admin)).status == 402

    provider = ShopProvider(credits=0)
    config = make_config(tmp_path, gate_bypass_roles=frozenset({"ADMIN"}))
    client = await make_client(config, provider=provider, host=_agent)
    assert (await client.post("/v1/agent/interact", json={}, headers=admin)).status == 200
    assert provider.calls.get("spend", 0) == 0
    observer = tokens.headers(role="observer")
    assert (await client.post("/v1/agent/interact", json={}, headers=observer)).status == 402
