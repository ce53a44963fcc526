"""Billing on an application that is itself mounted: every path is relative to that application.

`request.path` is the full path, so a nested application sees `/agent/health` for its own `/health`.
Each case builds the same agent application, sets billing up on it (sub-app mode and `subapp=False`),
mounts it (top level, under a prefix, two levels deep, on a domain, under a prefix on a domain) and
checks that the billing routes, their JSON errors, the protected paths, `get_identity`, the credit
gate and the login route all answer where the agent's own routes are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from ciris_billing_proxy import ConfigError, credit_gate, error_middleware, get_identity, setup_billing
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.users import UserStore

from .conftest import make_config
from .default_paths import BILLING, LOGIN

DOMAIN = "agent.example"


@dataclass
class Mounted:
    """The application that is served, and where the agent's own paths appear in it."""

    root: web.Application
    base: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def _tag(name: str) -> Any:
    @web.middleware
    async def tag(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.add("X-Passed", name)
            raise
        response.headers.add("X-Passed", name)
        return response

    return tag


async def _open(_request: web.Request) -> web.Response:
    return web.json_response({"open": True})


def _host() -> web.Application:
    """A host application with a route of its own at `/health` and its own middleware."""
    app = web.Application(middlewares=[_tag("host")])
    app.router.add_get("/health", _open)
    return app


def top(agent: web.Application) -> Mounted:
    return Mounted(agent)


def under_prefix(agent: web.Application) -> Mounted:
    outer = _host()
    outer.add_subapp("/agent", agent)
    return Mounted(outer, "/agent")


def two_levels_deep(agent: web.Application) -> Mounted:
    outer, middle = _host(), _host()
    middle.add_subapp("/b", agent)
    outer.add_subapp("/a", middle)
    return Mounted(outer, "/a/b")


def on_a_domain(agent: web.Application) -> Mounted:
    outer = _host()
    outer.add_domain(DOMAIN, agent)
    return Mounted(outer, "", {"Host": DOMAIN})


def under_a_prefix_on_a_domain(agent: web.Application) -> Mounted:
    # (The other way round, a domain under a prefix, aiohttp 3.14 itself cannot mount.)
    outer, middle = _host(), _host()
    middle.add_subapp("/b", agent)
    outer.add_domain(DOMAIN, middle)
    return Mounted(outer, "/b", {"Host": DOMAIN})


MOUNTS: list[Callable[[web.Application], Mounted]] = [
    top,
    under_prefix,
    two_levels_deep,
    on_a_domain,
    under_a_prefix_on_a_domain,
]


async def _whoami(request: web.Request) -> web.Response:
    return web.json_response({"user_id": get_identity(request).user_id})


@credit_gate
async def _interact(request: web.Request) -> web.Response:
    return web.json_response({"reply": f"hello {get_identity(request).user_id}"})


def _agent(config_dir: Path, *, subapp: bool) -> tuple[web.Application, TokenFactory]:
    """The agent: its own middleware, an open route, a protected one, `get_identity`, a gated route."""
    config = make_config(config_dir, protected_paths=("/health",))
    agent = web.Application(middlewares=[_tag("agent")])
    agent.router.add_get("/health", _open)
    agent.router.add_get("/healthcheck", _open)  # next to a protected path, not under it
    agent.router.add_get("/whoami", _whoami)
    agent.router.add_post("/v1/agent/interact", _interact)
    users = UserStore()
    users.add("ann", "correct horse")
    setup_billing(agent, config, subapp=subapp, authenticate=users.verify_login, environ={})
    return agent, TokenFactory(config)


@pytest.mark.parametrize("subapp", [True, False], ids=["subapp", "subapp=False"])
@pytest.mark.parametrize("mount", MOUNTS)
async def test_every_path_is_relative_to_the_application_billing_is_set_up_on(
    aiohttp_client: Any, tmp_path: Path, subapp: bool, mount: Callable[[web.Application], Mounted]
) -> None:
    agent, tokens = _agent(tmp_path, subapp=subapp)
    mounted = mount(agent)
    client = await aiohttp_client(mounted.root)
    base, anonymous = mounted.base, mounted.headers
    signed_in = {**anonymous, **tokens.headers("zoe")}

    async def call(method: str, path: str, headers: dict[str, str], status: int) -> Any:
        resp = await client.request(method, base + path, headers=headers)
        assert resp.status == status, (method, base + path)
        assert resp.content_type == "application/json", (method, base + path)
        assert "agent" in resp.headers.getall("X-Passed", []), "the agent's own middleware ran"
        return await resp.json()

    assert await call("GET", f"{BILLING}/credits", anonymous, 401) == {"detail": "Not authenticated"}
    assert (await call("GET", f"{BILLING}/credits", signed_in, 200))["free_uses_remaining"] == 10
    assert await call("GET", f"{BILLING}/nothing-here", signed_in, 404) == {"detail": "Not Found"}
    assert await call("POST", f"{BILLING}/credits", signed_in, 405) == {"detail": "Method Not Allowed"}

    assert await call("GET", "/health", anonymous, 401) == {"detail": "Not authenticated"}
    assert await call("GET", "/health", signed_in, 200) == {"open": True}
    assert await call("GET", "/healthcheck", anonymous, 200) == {"open": True}

    assert await call("GET", "/whoami", anonymous, 401) == {"detail": "Not authenticated"}
    assert await call("GET", "/whoami", signed_in, 200) == {"user_id": "zoe"}
    assert await call("POST", "/v1/agent/interact", signed_in, 200) == {"reply": "hello zoe"}
    assert (await call("GET", f"{BILLING}/credits", signed_in, 200))["free_uses_remaining"] == 9

    login = await client.post(
        base + LOGIN, json={"username": "ann", "password": "correct horse"}, headers=anonymous
    )
    assert login.status == 200
    token = (await login.json())["access_token"]
    assert (await call("GET", "/whoami", {**anonymous, "Authorization": f"Bearer {token}"}, 200)) == {
        "user_id": "ann"
    }


@pytest.mark.parametrize("subapp", [True, False], ids=["subapp", "subapp=False"])
async def test_protection_stays_inside_the_application_it_was_configured_on(
    aiohttp_client: Any, tmp_path: Path, subapp: bool
) -> None:
    agent, _ = _agent(tmp_path, subapp=subapp)
    mounted = under_prefix(agent)
    client = await aiohttp_client(mounted.root)
    # The host's own /health is not the agent's /health, and the agent's billing prefix is not the host's.
    assert (await client.get("/health")).status == 200
    resp = await client.get(f"{BILLING}/credits")
    assert resp.status == 404
    assert resp.content_type != "application/json"


async def test_a_sub_application_of_the_billing_application_shares_its_gate_and_protection(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    config = make_config(tmp_path, protected_paths=("/tools",))
    tokens = TokenFactory(config)
    agent = web.Application()
    setup_billing(agent, config, environ={})
    tools = web.Application()
    tools.router.add_get("/list", _open)
    tools.router.add_post("/run", _interact)
    agent.add_subapp("/tools", tools)
    outer = _host()
    outer.add_subapp("/agent", agent)
    client = await aiohttp_client(outer)

    resp = await client.get("/agent/tools/list")
    assert resp.status == 401
    assert await resp.json() == {"detail": "Not authenticated"}
    assert (await client.get("/agent/tools/list", headers=tokens.headers("zoe"))).status == 200
    assert (await client.post("/agent/tools/run", headers=tokens.headers("zoe"))).status == 200
    credits = await client.get(f"/agent{BILLING}/credits", headers=tokens.headers("zoe"))
    assert (await credits.json())["free_uses_remaining"] == 9


@pytest.mark.parametrize("protected", ["/", "/health/"])
async def test_a_protected_path_covers_the_mount_point_itself(
    aiohttp_client: Any, tmp_path: Path, protected: str
) -> None:
    config = make_config(tmp_path, protected_paths=(protected,))
    agent = web.Application()
    agent.router.add_get("/health", _open)
    agent.router.add_get("", _open)
    setup_billing(agent, config, environ={})
    outer = _host()
    outer.add_subapp("/agent", agent)
    client = await aiohttp_client(outer)
    assert (await client.get("/agent/health")).status == 401
    assert (await client.get("/health")).status == 200
    if protected == "/":
        assert (await client.get("/agent")).status == 401


@pytest.mark.parametrize("mount", ["add_subapp", "add_domain", "start"])
def test_setting_billing_up_on_a_mounted_or_started_application_is_refused(
    tmp_path: Path, mount: str
) -> None:
    agent = web.Application()
    if mount == "add_subapp":
        web.Application().add_subapp("/agent", agent)
    elif mount == "add_domain":
        web.Application().add_domain(DOMAIN, agent)
    else:
        agent.freeze()
    with pytest.raises(ConfigError, match=r"before the application is mounted"):
        setup_billing(agent, make_config(tmp_path), environ={})


@pytest.mark.parametrize("use", ["get_identity", "credit_gate"])
async def test_without_setup_billing_the_log_says_to_call_it(
    aiohttp_client: Any, tmp_path: Path, tokens: TokenFactory, caplog: pytest.LogCaptureFixture, use: str
) -> None:
    # Billing is set up on the agent only; the host's own handler cannot reach it.
    agent = web.Application()
    setup_billing(agent, make_config(tmp_path), environ={})
    outer = web.Application(middlewares=[error_middleware()])
    outer.router.add_get("/me", _whoami if use == "get_identity" else credit_gate(_whoami))
    outer.add_subapp("/agent", agent)
    client = await aiohttp_client(outer)
    with caplog.at_level(logging.ERROR, logger="ciris_billing_proxy"):
        resp = await client.get("/me", headers=tokens.headers())
    assert resp.status == 500
    assert await resp.json() == {"detail": "Internal server error"}
    assert "call setup_billing() first" in caplog.text
    assert "KeyError" not in caplog.text


@pytest.mark.parametrize("use", ["get_identity", "credit_gate"])
async def test_an_application_without_billing_anywhere_gets_the_clear_error_not_a_key_error(
    aiohttp_client: Any, tokens: TokenFactory, caplog: pytest.LogCaptureFixture, use: str
) -> None:
    seen: list[BaseException] = []

    async def whoami(request: web.Request) -> web.Response:
        try:
            return await (_whoami if use == "get_identity" else credit_gate(_whoami))(request)
        except Exception as exc:
            seen.append(exc)
            raise

    app = web.Application(middlewares=[error_middleware()])
    app.router.add_get("/me", whoami)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR, logger="ciris_billing_proxy"):
        resp = await client.get("/me", headers=tokens.headers())
    assert resp.status == 500
    assert await resp.json() == {"detail": "Internal server error"}
    assert [type(exc) for exc in seen] == [RuntimeError]
    assert str(seen[0]).startswith("call setup_billing() first")
    assert "KeyError" not in caplog.text
