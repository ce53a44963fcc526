"""`POST /v1/auth/logout`, `POST /v1/auth/refresh` and `GET /v1/auth/me` over real HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciris_billing_proxy import AuthenticatedUser, BillingConfig
from ciris_billing_proxy.client import AuthenticationError, BillingClient
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.demo import create_demo_app
from ciris_billing_proxy.tools.users import UserStore

from .conftest import SECRET, ClientFactory, make_config
from .default_paths import CREDITS, LOGIN, LOGOUT, ME, REFRESH

CREATED = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)

Client = TestClient[web.Request, web.Application]


async def authenticate(username: str, password: str) -> AuthenticatedUser | None:
    if (username, password) == ("ann", "pw-ann"):
        return AuthenticatedUser("ann", email="ann@example.com", created_at=CREATED)
    if (username, password) == ("root", "pw-root"):
        return AuthenticatedUser("root", role="admin")
    return None


@pytest.fixture
async def login_client(make_client: ClientFactory, config: BillingConfig) -> Client:
    return await make_client(config, authenticate=authenticate)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client: Client, username: str = "ann") -> str:
    resp = await client.post(LOGIN, json={"username": username, "password": f"pw-{username}"})
    assert resp.status == 200
    token: str = (await resp.json())["access_token"]
    return token


async def test_logout_revokes_exactly_the_presented_token(login_client: Client) -> None:
    token, other = await login(login_client), await login(login_client)
    assert (await login_client.get(CREDITS, headers=bearer(token))).status == 200
    resp = await login_client.post(LOGOUT, headers=bearer(token))
    assert resp.status == 200
    assert await resp.json() == {"status": "logged_out"}
    after = await login_client.get(CREDITS, headers=bearer(token))
    assert (after.status, await after.json()) == (401, {"detail": "Invalid token"})
    assert (await login_client.get(ME, headers=bearer(token))).status == 401
    assert (await login_client.post(LOGOUT, headers=bearer(token))).status == 401
    assert (await login_client.get(CREDITS, headers=bearer(other))).status == 200  # the user's other session


async def test_refresh_answers_a_new_token_and_revokes_the_old_one(login_client: Client) -> None:
    old = await login(login_client)
    resp = await login_client.post(REFRESH, json={"refresh_token": "current_token"}, headers=bearer(old))
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "user_id", "role"}
    assert (body["token_type"], body["expires_in"], body["user_id"], body["role"]) == (
        "Bearer",
        3600,
        "ann",
        "OBSERVER",
    )
    new = body["access_token"]
    assert new != old
    assert (await login_client.get(CREDITS, headers=bearer(old))).status == 401
    assert (await login_client.get(CREDITS, headers=bearer(new))).status == 200
    claims = jwt.decode(new, SECRET, algorithms=["HS256"])
    assert (claims["email"], claims["created_at"]) == ("ann@example.com", int(CREATED.timestamp()))
    # An empty body is fine too (the body's refresh_token is never used).
    again = await login_client.post(REFRESH, headers=bearer(new))
    assert again.status == 200


async def test_refresh_keeps_the_identity_namespace_and_tenant(
    login_client: Client, tokens: TokenFactory
) -> None:
    google = tokens.token("g-123", oauth_provider="google", tenant="acme", email="g@example.com")
    resp = await login_client.post(REFRESH, headers=bearer(google))
    assert resp.status == 200
    new = (await resp.json())["access_token"]
    claims = jwt.decode(new, SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["oauth_provider"], claims["tenant"]) == ("g-123", "google", "acme")
    assert claims["role"] == "OBSERVER"  # the default role, now explicit


async def test_me_describes_the_caller(
    make_client: ClientFactory, tmp_path: Path, tokens: TokenFactory
) -> None:
    client = await make_client(
        make_config(tmp_path, gate_bypass_roles=frozenset({"ADMIN"})), authenticate=authenticate
    )
    resp = await client.get(ME, headers=bearer(await login(client)))
    assert resp.status == 200
    assert await resp.json() == {
        "user_id": "ann",
        "username": "ann",
        "role": "OBSERVER",
        "permissions": ["view_billing", "purchase_credits"],
        "created_at": "2025-03-04T05:06:07+00:00",
    }
    root = await (await client.get(ME, headers=bearer(await login(client, "root")))).json()
    assert root["role"] == "ADMIN"
    assert root["permissions"] == ["view_billing", "purchase_credits", "bypass_credit_gate"]
    # A user store that does not know when the user was created: the token's issue time.
    issued = datetime.fromisoformat(root["created_at"])
    assert abs(issued.timestamp() - datetime.now(UTC).timestamp()) < 600
    # A token from elsewhere, with its own iat.
    other = await client.get(ME, headers=bearer(tokens.token("zoe", iat=1_700_000_000)))
    assert (await other.json())["created_at"] == "2023-11-14T22:13:20+00:00"


@pytest.mark.parametrize("path", [LOGOUT, REFRESH, ME])
@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "Not authenticated"),
        ({"Authorization": "Basic YTpi"}, "Not authenticated"),
        ({"Authorization": "Bearer not.a.jwt"}, "Invalid token"),
    ],
)
async def test_no_valid_token_is_401(
    login_client: Client, path: str, headers: dict[str, str], detail: str
) -> None:
    method = "GET" if path == ME else "POST"
    resp = await login_client.request(method, path, headers=headers)
    assert resp.status == 401
    assert await resp.json() == {"detail": detail}
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", [LOGOUT, REFRESH, ME])
async def test_expired_token_is_401(login_client: Client, tokens: TokenFactory, path: str) -> None:
    method = "GET" if path == ME else "POST"
    resp = await login_client.request(method, path, headers=bearer(tokens.token("ann", ttl=-60)))
    assert (resp.status, await resp.json()) == (401, {"detail": "Token expired"})


@pytest.mark.parametrize(("path", "allow"), [(LOGOUT, "POST"), (REFRESH, "POST"), (ME, "GET")])
async def test_wrong_method_is_json_405(login_client: Client, path: str, allow: str) -> None:
    resp = await login_client.request("DELETE", path, headers=bearer(await login(login_client)))
    assert resp.status == 405
    assert resp.headers["Allow"] == allow
    assert await resp.json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"{oops", 400),
        (b"[]", 422),
        (b'{"refresh_token": 5}', 422),
        (b'{"refresh_token": "' + b"a" * 10000 + b'"}', 413),
    ],
)
async def test_malformed_refresh_bodies(login_client: Client, data: bytes, status: int) -> None:
    token = await login(login_client)
    headers = {**bearer(token), "Content-Type": "application/json"}
    resp = await login_client.post(REFRESH, data=data, headers=headers)
    assert resp.status == status
    assert "detail" in await resp.json()
    assert (await login_client.get(CREDITS, headers=bearer(token))).status == 200  # not revoked


async def test_a_malformed_body_without_a_token_is_401(login_client: Client) -> None:
    resp = await login_client.post(REFRESH, data=b"{oops", headers={"Content-Type": "application/json"})
    assert resp.status == 401


async def test_expect_continue_only_for_a_valid_token(login_client: Client) -> None:
    resp = await login_client.post(REFRESH, data=b"{}", headers={"Expect": "100-continue"})
    assert (resp.status, await resp.json()) == (401, {"detail": "Not authenticated"})
    token = await login(login_client)
    ok = await login_client.post(REFRESH, data=b"{}", headers={"Expect": "100-continue", **bearer(token)})
    assert ok.status == 200


async def test_routes_live_beside_a_custom_login_path(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    client = await make_client(config, authenticate=authenticate, login_path="/api/session/login")
    resp = await client.post("/api/session/login", json={"username": "ann", "password": "pw-ann"})
    token = (await resp.json())["access_token"]
    assert (await client.get("/api/session/me", headers=bearer(token))).status == 200
    assert (await client.post("/api/session/logout", headers=bearer(token))).status == 200
    assert (await client.get(ME, headers=bearer(token))).status == 404


async def test_no_auth_routes_unless_asked(make_client: ClientFactory, config: BillingConfig) -> None:
    client = await make_client(config)
    for path in (LOGOUT, REFRESH, ME):
        assert (await client.post(path)).status == 404


async def test_demo_user_store_reports_creation_time(tmp_path: Path, make_client: ClientFactory) -> None:
    store = UserStore()
    before = datetime.now(UTC).replace(microsecond=0)
    store.add("ann", "pw-ann")
    client = await make_client(make_config(tmp_path), authenticate=store.verify_login)
    token = await login(client)
    created = datetime.fromisoformat(
        (await (await client.get(ME, headers=bearer(token))).json())["created_at"]
    )
    assert before <= created <= datetime.now(UTC)


async def test_users_saved_without_a_creation_time_still_log_in(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    store = UserStore()
    store.add("ann", "pw-ann")
    path = tmp_path / "users.json"
    store.save(path)
    rows = json.loads(path.read_text())
    for row in rows:
        del row["created_at"]  # a file written before creation times were kept
    path.write_text(json.dumps(rows))
    client = await make_client(make_config(tmp_path), authenticate=UserStore.load(path).verify_login)
    token = await login(client)
    me = await (await client.get(ME, headers=bearer(token))).json()
    issued = jwt.decode(token, SECRET, algorithms=["HS256"])["iat"]
    assert me["created_at"] == datetime.fromtimestamp(issued, UTC).isoformat()


async def test_python_client_logout_refresh_me(tmp_path: Path) -> None:
    users = UserStore()
    users.add("ann", "pw-ann")
    app = create_demo_app(make_config(tmp_path), users, environ={})
    server = TestServer(app)
    await server.start_server()
    try:
        async with BillingClient(str(server.make_url("")).rstrip("/")) as api:
            await api.login("ann", "pw-ann")
            first = api.token
            me = await api.me()
            assert (me.user_id, me.username, me.role) == ("ann", "ann", "OBSERVER")
            refreshed = await api.refresh()
            assert api.token == refreshed.access_token != first
            await api.get_credits()
            kept = api.token
            await api.logout()
            assert api.token is None
            api.token = kept
            with pytest.raises(AuthenticationError):
                await api.get_credits()
    finally:
        await server.close()


async def test_python_client_accepts_a_204_logout(aiohttp_server: Any) -> None:
    async def logout(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post(LOGOUT, logout)
    server = await aiohttp_server(app)
    async with BillingClient(str(server.make_url("")).rstrip("/"), token="t") as api:
        await api.logout()
        assert api.token is None
