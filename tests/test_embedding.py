"""Billing's error replies reach the client unchanged through a host middleware that formats every
`HTTPException` it catches: with the sub-app, with `subapp=False`, and from the credit gate on the
host's own routes (bodies, `WWW-Authenticate`, `Retry-After`, the CORS labels), the tool routes and
the tool gate included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler

from ciris_billing_proxy import credit_gate, setup_billing
from ciris_billing_proxy.providers.base import CreditProvider
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.token_limit import TOO_MANY_TOKENS

from .conftest import CountingAuthenticator, make_config
from .default_paths import CREDITS, LOGIN, REFRESH
from .providers import BrokenProvider

INTERACT = "/v1/agent/interact"
PROTECTED = "/v1/agent/history"
SEARCH, UNSOLD = "/v1/agent/search", "/v1/agent/image"
TOOLS = "/v1/api/tools"
ORIGIN = "https://app.example"
MOUNTS = ("subapp", "flat", "mounted")


@web.middleware
async def formats_http_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The host middleware seen rewriting billing's errors: every HTTPException becomes the host's own
    JSON shape, with the exception's headers dropped."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        return web.json_response({"error": e.reason}, status=e.status)


@credit_gate
async def interact(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@credit_gate(product="web_search")
async def search(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@credit_gate(product="image_gen")
async def unsold(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def history(request: web.Request) -> web.Response:
    return web.json_response([])


async def serve(
    aiohttp_client: Any,
    tmp_path: Path,
    mount: str,
    provider: CreditProvider | None = None,
    **overrides: Any,
) -> tuple[TestClient[web.Request, web.Application], str]:
    """The host app with its formatting middleware first, billing set up in one of three ways, and a
    gated, a tool-gated and a protected host route; returns the client and the path prefix of
    billing's app."""
    config = make_config(
        tmp_path,
        provider_options={
            "database": ":memory:",
            "free_uses": 1,
            "products": {"web_search": {"free_uses": 1}},
        },
        protected_paths=(PROTECTED,),
        **overrides,
    )
    host = web.Application(middlewares=[formats_http_errors])
    billed = host if mount != "mounted" else web.Application()
    setup_billing(
        billed,
        config,
        provider=provider,
        authenticate=CountingAuthenticator(),
        subapp=mount != "flat",
        environ={},
    )
    billed.router.add_post(INTERACT, interact)
    billed.router.add_post(SEARCH, search)
    billed.router.add_post(UNSOLD, unsold)
    billed.router.add_get(PROTECTED, history)
    base = ""
    if mount == "mounted":
        base = "/agent"
        host.add_subapp(base, billed)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(host)
    return client, base


async def expect(resp: Any, status: int, detail: Any, **headers: str) -> None:
    assert resp.status == status
    assert await resp.json() == {"detail": detail}
    assert resp.headers["Content-Type"].startswith("application/json")
    for name, value in headers.items():
        assert resp.headers.get(name.replace("_", "-")) == value
    assert resp.headers.get("X-Request-ID")


@pytest.mark.parametrize("mount", MOUNTS)
async def test_missing_and_bad_tokens(aiohttp_client: Any, tmp_path: Path, mount: str) -> None:
    client, base = await serve(aiohttp_client, tmp_path, mount)
    for path in (CREDITS, INTERACT, PROTECTED):
        method = client.post if path == INTERACT else client.get
        await expect(await method(base + path), 401, "Not authenticated", WWW_Authenticate="Bearer")
        await expect(
            await method(base + path, headers={"Authorization": "Bearer a.b.c"}),
            401,
            "Invalid token",
            WWW_Authenticate='Bearer error="invalid_token"',
        )


@pytest.mark.parametrize("mount", MOUNTS)
async def test_no_credit_and_unknown_paths(aiohttp_client: Any, tmp_path: Path, mount: str) -> None:
    client, base = await serve(aiohttp_client, tmp_path, mount)
    headers = TokenFactory(make_config(tmp_path)).headers("ann")
    assert (await client.post(base + INTERACT, headers=headers)).status == 200
    refused = await client.post(base + INTERACT, headers=headers)
    await expect(
        refused,
        402,
        {
            "error": "insufficient_credit",
            "message": "You do not have enough credit for this request.",
            "reason": "No free uses remaining",
        },
    )
    await expect(await client.get(base + CREDITS + "/nope", headers=headers), 404, "Not Found")
    await expect(
        await client.delete(base + CREDITS, headers=headers), 405, "Method Not Allowed", Allow="GET,HEAD"
    )


@pytest.mark.parametrize("mount", MOUNTS)
async def test_provider_down(aiohttp_client: Any, tmp_path: Path, mount: str) -> None:
    client, base = await serve(aiohttp_client, tmp_path, mount, provider=BrokenProvider())
    headers = TokenFactory(make_config(tmp_path)).headers("ann")
    await expect(await client.get(base + CREDITS, headers=headers), 503, "Billing service unavailable")
    await expect(await client.post(base + INTERACT, headers=headers), 503, "Credit provider unavailable")


@pytest.mark.parametrize("mount", MOUNTS)
async def test_locked_login_keeps_retry_after(aiohttp_client: Any, tmp_path: Path, mount: str) -> None:
    client, base = await serve(aiohttp_client, tmp_path, mount)
    for _ in range(5):
        wrong = await client.post(base + LOGIN, json={"username": "ann", "password": "wrong"})
        await expect(wrong, 401, "Invalid credentials")
    sixth = await client.post(base + LOGIN, json={"username": "ann", "password": "wrong"})
    await expect(sixth, 429, "Too many login attempts", Retry_After="900")
    malformed = await client.post(base + LOGIN, json=["ann"])
    assert (malformed.status, list(await malformed.json())) == (422, ["detail"])


@pytest.mark.parametrize("mount", MOUNTS)
async def test_too_many_new_tokens_keeps_retry_after(aiohttp_client: Any, tmp_path: Path, mount: str) -> None:
    client, base = await serve(aiohttp_client, tmp_path, mount, token_issue_max_per_user=1)
    login = {"username": "ann", "password": "correct horse"}
    token = (await (await client.post(base + LOGIN, json=login)).json())["access_token"]
    await expect(await client.post(base + LOGIN, json=login), 429, TOO_MANY_TOKENS, Retry_After="3600")
    refreshed = await client.post(base + REFRESH, headers={"Authorization": f"Bearer {token}"})
    await expect(refreshed, 429, TOO_MANY_TOKENS, Retry_After="3600")


@pytest.mark.parametrize("mount", MOUNTS)
async def test_tool_routes_and_tool_gate(aiohttp_client: Any, tmp_path: Path, mount: str) -> None:
    client, base = await serve(aiohttp_client, tmp_path, mount)
    headers = TokenFactory(make_config(tmp_path)).headers("ann")
    await expect(await client.post(base + SEARCH), 401, "Not authenticated", WWW_Authenticate="Bearer")
    await expect(
        await client.get(base + TOOLS + "/balance/nope", headers=headers), 404, "Tool not found: nope"
    )
    await expect(await client.post(base + UNSOLD, headers=headers), 404, "Tool not found: image_gen")
    assert (await client.post(base + SEARCH, headers=headers)).status == 200
    no_credit = {
        "error": "insufficient_credit",
        "message": "You do not have enough credit for this request.",
        "reason": "No web_search uses remaining",
    }
    await expect(await client.post(base + SEARCH, headers=headers), 402, no_credit)


@pytest.mark.parametrize("mount", MOUNTS)
async def test_cors_labels_survive(aiohttp_client: Any, tmp_path: Path, mount: str) -> None:
    client, base = await serve(aiohttp_client, tmp_path, mount, cors_origins=(ORIGIN,))
    refused = await client.get(base + CREDITS, headers={"Origin": ORIGIN})
    await expect(refused, 401, "Not authenticated", WWW_Authenticate="Bearer", Vary="Origin")
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert refused.headers["Access-Control-Expose-Headers"] == "Retry-After"
