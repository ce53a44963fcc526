"""Findings of the auth review: nested verifiers, revocation retention, `Expect:` on every billing
route, slow bodies, OPTIONS on protected paths, and the user store's names and file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, ConfigError, credit_gate, get_identity, setup_billing
from ciris_billing_proxy import auth as auth_module
from ciris_billing_proxy.auth import TokenVerifier
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.demo import USERS_FILE, create_demo_app, load_or_create_users
from ciris_billing_proxy.tools.users import UserStore

from .conftest import SECRET, make_config
from .default_paths import BILLING, CREDITS, INITIATE, LOGIN, REFRESH, STATUS, TRANSACTIONS
from .providers import ShopProvider
from .serving import COMMAND, clean_env, get_credits, serve

OTHER_SECRET = "another-secret-for-the-inner-app-0123456789-abcdefghijklmnopqrstuvwxyz"
SERVE = (*COMMAND, "serve")
PATIENCE = 30.0  # far beyond every deadline configured below: only a hang could exhaust it


# -- 1. a nested application verifies with its own key ------------------------------------------


@credit_gate
async def _whoami(request: web.Request) -> web.Response:
    identity = get_identity(request)
    return web.json_response({"user": identity.user_id, "namespace": identity.namespace})


def _nested(tmp_path: Path, inner_secret: str) -> tuple[web.Application, web.Application]:
    """The reviewer's setup: billing on both, the outer app protecting the inner one's mount."""
    inner = web.Application()
    inner_config = make_config(tmp_path / "inner", jwt={"secret": inner_secret}, identity_namespace="inner")
    setup_billing(inner, inner_config, provider=ShopProvider(credits=5), environ={})
    inner.router.add_post("/interact", _whoami)
    outer = web.Application()
    outer_config = make_config(tmp_path / "outer", identity_namespace="outer", protected_paths=("/agent",))
    setup_billing(outer, outer_config, environ={})
    outer.add_subapp("/agent", inner)
    return outer, inner


async def test_a_nested_gated_handler_refuses_a_token_signed_with_the_outer_key(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    outer, inner = _nested(tmp_path, OTHER_SECRET)
    client = await aiohttp_client(outer)
    outer_token = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 600}, SECRET)
    resp = await client.post("/agent/interact", headers={"Authorization": f"Bearer {outer_token}"})
    assert resp.status == 401
    assert await resp.json() == {"detail": "Invalid token"}
    provider = inner[SERVICE_KEY].provider
    assert isinstance(provider, ShopProvider)
    assert provider.calls.get("spend", 0) == 0, "the inner provider was charged for a foreign token"


async def test_a_nested_handler_sees_the_identity_its_own_verifier_makes(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    # One key, two namespaces: the token passes both apps, and the inner handler must get the
    # inner app's reading of it, not the one the outer middleware left on the request.
    outer, _inner = _nested(tmp_path, SECRET)
    client = await aiohttp_client(outer)
    token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 600}, SECRET)
    resp = await client.post("/agent/interact", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    assert await resp.json() == {"user": "ann", "namespace": "inner"}


# -- 2. revocations last as long as their tokens -------------------------------------------------


def _verifier(tmp_path: Path, now: list[float]) -> tuple[TokenVerifier, TokenFactory]:
    config = make_config(tmp_path, jwt={"secret": SECRET, "leeway_seconds": 10})
    return TokenVerifier(config, clock=lambda: now[0]), TokenFactory(config)


def test_a_revocation_is_forgotten_once_its_token_has_expired(tmp_path: Path) -> None:
    now = [time.time()]
    verifier, factory = _verifier(tmp_path, now)
    short, long = factory.token("ann", ttl=600), factory.token("bob", ttl=7200)
    verifier.revoke(short)
    verifier.revoke(long)
    for token in (short, long):
        with pytest.raises(auth_module.AuthError, match="Invalid token"):
            verifier.verify(token)
    # Past `short`'s exp, the leeway and its batch (`REVOCATION_BATCH_SECONDS`): refused as expired,
    # revoked or not.
    now[0] += 600 + 10 + auth_module.REVOCATION_BATCH_SECONDS + 5
    verifier.revoke(factory.token("cy", ttl=600))
    assert len(verifier._revoked) == 2  # bob's and cy's; ann's went with her token's expiry
    with pytest.raises(auth_module.AuthError, match="Invalid token"):
        verifier.verify(long)


def test_a_token_the_verifier_refuses_takes_no_revocation(tmp_path: Path) -> None:
    verifier, factory = _verifier(tmp_path, [time.time()])
    verifier.revoke("not.a.token")
    verifier.revoke(jwt.encode({"sub": "x", "exp": int(time.time()) + 600}, OTHER_SECRET))
    verifier.revoke(factory.token("ann", ttl=-60))  # expired beyond the leeway
    assert len(verifier._revoked) == 0


def test_no_revocation_is_dropped_to_make_room(tmp_path: Path) -> None:
    """There is no cap that pushes out the revocation expiring soonest (issue #17): what bounds their
    number is the per-user limit on new tokens."""
    verifier, factory = _verifier(tmp_path, [time.time()])
    tokens = {ttl: factory.token(f"user-{ttl}", ttl=ttl) for ttl in (3000, 1000, 4000, 2000)}
    for token in tokens.values():
        verifier.revoke(token)
    assert verifier.revocations_kept == 4
    for token in tokens.values():
        with pytest.raises(auth_module.AuthError, match="Invalid token"):
            verifier.verify(token)


# -- 4. `Expect:` on every billing route -------------------------------------------------------


async def _raw(port: int, request: str) -> bytes:
    """Send `request`, read everything until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), PATIENCE)
    finally:
        writer.close()


def _request(method: str, path: str, expect: str, token: str | None = None) -> str:
    # The body goes with the head, as many clients do: a refusal then needs no wait for it.
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Expect: {expect}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )


BILLING_ROUTES = [
    ("GET", CREDITS),
    ("GET", TRANSACTIONS),
    ("GET", f"{STATUS}pi_1"),
    ("POST", INITIATE),
]
UNMATCHED = [
    ("GET", f"{BILLING}/nope"),
    ("GET", BILLING),
    ("POST", CREDITS),
]


@pytest.mark.parametrize(
    ("subapp", "method", "path"),
    [(True, m, p) for m, p in BILLING_ROUTES + UNMATCHED] + [(False, m, p) for m, p in BILLING_ROUTES],
)
async def test_every_billing_route_answers_expect_in_json_after_the_token_check(
    aiohttp_client: Any, config: BillingConfig, tokens: TokenFactory, subapp: bool, method: str, path: str
) -> None:
    app = web.Application()
    setup_billing(app, config, provider=ShopProvider(), subapp=subapp, environ={})
    port = (await aiohttp_client(app)).server.port

    refused = await _raw(port, _request(method, path, "foo", tokens.token()))
    assert refused.startswith(b"HTTP/1.1 417"), refused
    assert refused.endswith(b'{"detail": "Only \'Expect: 100-continue\' is supported"}'), refused

    anonymous = await _raw(port, _request(method, path, "100-continue"))
    assert anonymous.startswith(b"HTTP/1.1 401"), anonymous  # no `100 Continue` before it
    assert anonymous.endswith(b'{"detail": "Not authenticated"}'), anonymous

    invited = await _raw(port, _request(method, path, "100-continue", tokens.token()))
    assert invited.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 "), invited


@pytest.mark.parametrize(
    ("method", "path", "status", "detail", "allow"),
    [
        ("GET", f"{BILLING}/nope", 404, "Not Found", None),
        ("GET", BILLING, 404, "Not Found", None),
        ("GET", f"{STATUS}a/b", 404, "Not Found", None),
        ("POST", CREDITS, 405, "Method Not Allowed", "GET,HEAD"),
        ("GET", INITIATE, 405, "Method Not Allowed", "POST"),
    ],
)
async def test_unmatched_billing_paths_are_json_404_and_405(
    aiohttp_client: Any,
    config: BillingConfig,
    tokens: TokenFactory,
    method: str,
    path: str,
    status: int,
    detail: str,
    allow: str | None,
) -> None:
    app = web.Application()
    setup_billing(app, config, environ={})
    client = await aiohttp_client(app)
    assert (await client.request(method, path)).status == 401  # the token is checked first
    resp = await client.request(method, path, headers=tokens.headers())
    assert resp.status == status
    assert await resp.json() == {"detail": detail}
    assert resp.headers.get("Allow") == allow


# -- 5. slow request bodies ----------------------------------------------------------------------


@asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[int]:
    """`app` on loopback, as `serve` runs it but for aiohttp's lingering: `lingering_time=0` closes
    a connection as soon as a reply leaves a body unread, instead of reading and discarding the rest
    for up to 10 s first (the `serve` test below waits for that)."""
    runner = web.AppRunner(app, handler_cancellation=False, lingering_time=0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def _stalled(port: int, path: str, headers: dict[str, str]) -> tuple[bytes, bytes]:
    """Announce a 100-byte body, send 10 bytes of it and wait: the reply's head, and the rest of
    what arrives until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{lines}"
        "Content-Length: 100\r\n\r\n".encode()
        + b'{"message"'
    )
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PATIENCE)
        return head, await asyncio.wait_for(reader.read(), PATIENCE)
    finally:
        writer.close()


def _plain_host(config: BillingConfig) -> web.Application:
    """Login, auth and billing routes (a provider that sells) on an app without error middleware."""
    users = UserStore()
    users.add("ann", "pw")
    app = web.Application()
    setup_billing(app, config, provider=ShopProvider(), authenticate=users.verify_login, environ={})
    return app


@pytest.mark.parametrize(
    ("path", "signed_in"),
    [
        (LOGIN, False),
        (REFRESH, True),
        (INITIATE, True),
        ("/v1/agent/interact", True),
    ],
)
async def test_a_body_that_does_not_arrive_in_time_is_a_408_that_closes_the_connection(
    tmp_path: Path, path: str, signed_in: bool
) -> None:
    config = make_config(tmp_path, body_timeout_seconds=0.2)
    demo = path == "/v1/agent/interact"
    app = create_demo_app(config, UserStore(), environ={}) if demo else _plain_host(config)
    async with _serving(app) as port:
        head, body = await _stalled(port, path, TokenFactory(config).headers("zoe") if signed_in else {})
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"Connection: close" in head
    assert json.loads(body) == {"detail": "Request body not received in time"}


async def test_a_gated_interaction_whose_body_is_late_costs_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path, body_timeout_seconds=0.2)
    factory = TokenFactory(config)
    async with _serving(create_demo_app(config, UserStore(), environ={})) as port:
        before = await get_credits(port, factory)
        head, _body = await _stalled(port, "/v1/agent/interact", factory.headers("zoe"))
        assert head.startswith(b"HTTP/1.1 408")
        assert await get_credits(port, factory) == before


def test_the_body_deadline_comes_from_the_environment() -> None:
    config = BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET, "CIRIS_BODY_TIMEOUT_SECONDS": "5"})
    assert config.body_timeout_seconds == 5
    assert BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET}).body_timeout_seconds == 30
    with pytest.raises(ConfigError, match="body_timeout_seconds"):
        BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET, "CIRIS_BODY_TIMEOUT_SECONDS": "0"})


async def test_serve_answers_a_login_body_that_never_comes_and_hangs_up(tmp_path: Path) -> None:
    env = clean_env(CIRIS_BODY_TIMEOUT_SECONDS="0.3")
    with serve(["--user", "ann:pw"], tmp_path, env) as server:
        port = int(server.url.rsplit(":", 1)[1])
        # Read to the end: the server closes the connection (after aiohttp's lingering time, 10 s,
        # for the rest of the body), so this returns well within PATIENCE.
        head, rest = await _stalled(port, LOGIN, {})
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(rest) == {"detail": "Request body not received in time"}


# -- 6. only a real CORS preflight skips the token check ----------------------------------------


async def _admin_data(request: web.Request) -> web.Response:
    return web.json_response({"secret": "admin data", "method": request.method})


@pytest.mark.parametrize("path", ["/admin/data", CREDITS])
async def test_options_without_preflight_headers_needs_a_token(
    aiohttp_client: Any, tmp_path: Path, tokens: TokenFactory, path: str
) -> None:
    app = web.Application()
    setup_billing(app, make_config(tmp_path, protected_paths=("/admin",)), environ={})
    app.router.add_route("*", "/admin/data", _admin_data)
    client = await aiohttp_client(app)
    for headers in ({}, {"Origin": "https://ui.example"}, {"Access-Control-Request-Method": "GET"}):
        resp = await client.options(path, headers=headers)
        assert resp.status == 401, headers
        assert await resp.json() == {"detail": "Not authenticated"}
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "GET"}
    resp = await client.options(path, headers=preflight)
    assert resp.status != 401  # the host's CORS handling (here none: its handler, or a 405) answers


# -- 7. the user store's names and file -----------------------------------------------------------


@pytest.mark.parametrize("clash", ["bob", "BOB", "Bob", "\uff42\uff4f\uff42"])
def test_the_user_store_refuses_names_the_throttle_counts_as_one(clash: str) -> None:
    users = UserStore()
    users.add("Bob", "pw")
    with pytest.raises(ValueError, match="clashes with existing user 'Bob'"):
        users.add(clash, "other")
    assert len(users) == 1


def test_serve_refuses_two_users_with_one_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [*SERVE, "--data-dir", str(tmp_path), "--user", "Bob:pw1", "--user", "bob:pw2"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--user: user 'bob' clashes with existing user 'Bob'" in result.stderr


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "{}",
        '[{"name": "ann"}]',
        '[{"username": "ann", "password_hash": 5}]',
        '[{"username": "ann", "password_hash": "x", "created_at": "yesterday"}]',
        '[{"username": "ann", "password_hash": "x"}, {"username": "ANN", "password_hash": "y"}]',
        "\udcff",
    ],
)
def test_an_unreadable_users_file_is_a_one_line_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / USERS_FILE
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as raised:
        load_or_create_users(tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path} is not a users file (")
    assert message.endswith(f"delete {path} and start again, or run serve --user NAME:PASSWORD")


def test_serve_with_a_corrupt_users_file_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / USERS_FILE).write_text("[{]")
    result = subprocess.run(
        [*SERVE, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"ciris-billing-proxy: {tmp_path / USERS_FILE} is not a users file")
    assert "start again, or run serve --user NAME:PASSWORD" in result.stderr
