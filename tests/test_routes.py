"""The billing routes with the `simple` provider, against docs/billing-api.md and docs/compatibility.md."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciris_billing_proxy import Identity
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.testing import TokenFactory

from .default_paths import BILLING, CREDITS, INITIATE, STATUS

Client = TestClient[web.Request, web.Application]
A_STATUS = f"{STATUS}pi_abc123xyz789"
FRESH_USER_CREDIT_TYPES = {
    "has_credit": bool,
    "credits_remaining": int,
    "free_uses_remaining": int,
    "total_uses": int,
    "plan_name": str,
    "purchase_required": bool,
    "purchase_options": type(None),
}


async def test_credits_has_all_seven_fields_with_their_types(
    billing_client: Client, tokens: TokenFactory
) -> None:
    resp = await billing_client.get(CREDITS, headers=tokens.headers())
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    for field, kind in FRESH_USER_CREDIT_TYPES.items():
        assert field in body, field
        assert type(body[field]) is kind, (field, body[field])
    assert body == {
        "has_credit": True,
        "credits_remaining": 0,
        "free_uses_remaining": 10,
        "total_uses": 0,
        "plan_name": "free",
        "purchase_required": False,
        "purchase_options": None,
    }
    assert "data" not in body


async def test_credits_are_per_user(billing_client: Client, tokens: TokenFactory) -> None:
    service = billing_client.app[SERVICE_KEY]
    await service.spend(Identity("alice", "local", "OBSERVER"), "k1")
    alice = await (await billing_client.get(CREDITS, headers=tokens.headers("alice"))).json()
    bob = await (await billing_client.get(CREDITS, headers=tokens.headers("bob"))).json()
    assert alice["free_uses_remaining"] == 9
    assert bob["free_uses_remaining"] == 10


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", INITIATE, {"return_url": "https://app.example/done"}),
        ("POST", INITIATE, {}),
        ("POST", INITIATE, None),
        ("GET", A_STATUS, None),
    ],
)
async def test_purchase_routes_answer_403_when_billing_is_disabled(
    billing_client: Client, tokens: TokenFactory, method: str, path: str, body: Any
) -> None:
    resp = await billing_client.request(method, path, json=body, headers=tokens.headers())
    assert resp.status == 403
    assert await resp.json() == {"detail": "Billing not enabled for this agent"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", CREDITS), ("POST", INITIATE), ("GET", A_STATUS), ("GET", f"{BILLING}/unknown")],
)
async def test_every_route_needs_a_token(billing_client: Client, method: str, path: str) -> None:
    resp = await billing_client.request(method, path)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert await resp.json() == {"detail": "Not authenticated"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", f"{BILLING}/unknown", 404),
        ("GET", BILLING, 404),
        ("GET", STATUS, 404),
        ("DELETE", CREDITS, 405),
        ("POST", CREDITS, 405),
        ("GET", INITIATE, 405),
        ("PUT", A_STATUS, 405),
    ],
)
async def test_unknown_paths_and_methods_are_json(
    billing_client: Client, tokens: TokenFactory, method: str, path: str, status: int
) -> None:
    resp = await billing_client.request(method, path, headers=tokens.headers())
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["detail"], str)
    if status == 405:
        assert "Allow" in resp.headers


async def test_sdk_headers_are_tolerated(billing_client: Client, tokens: TokenFactory) -> None:
    resp = await billing_client.get(CREDITS, headers={**tokens.headers(), "X-API-Version": "v1"})
    assert resp.status == 200
    assert "X-RateLimit-Limit" not in resp.headers


async def test_expect_continue_is_granted_only_to_a_valid_token(
    billing_client: Client, tokens: TokenFactory
) -> None:
    import asyncio

    host, port = billing_client.server.host, billing_client.server.port

    async def raw(headers: str) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"POST {INITIATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 2\r\n{headers}\r\n".encode()
        )
        await writer.drain()
        first = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        return first

    denied = await raw("Expect: 100-continue\r\n")
    assert denied.startswith(b"HTTP/1.1 401")
    assert b'{"detail": "Not authenticated"}' in denied
    granted = await raw(f"Expect: 100-continue\r\nAuthorization: Bearer {tokens.token()}\r\n")
    assert granted.startswith(b"HTTP/1.1 100 Continue")
    odd = await raw(f"Expect: something-else\r\nAuthorization: Bearer {tokens.token()}\r\n")
    assert odd.startswith(b"HTTP/1.1 417")
    assert b"application/json" in odd


async def test_two_authorization_headers_are_refused(billing_client: Client, tokens: TokenFactory) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict(
        [("Authorization", f"Bearer {tokens.token('a')}"), ("Authorization", f"Bearer {tokens.token('b')}")]
    )
    resp = await billing_client.get(CREDITS, headers=headers)
    assert resp.status == 401
    assert await resp.json() == {"detail": "Not authenticated"}
