"""A client that goes away mid-body is a normal event: no traceback, no ERROR, no 500, no charge.

The apps are served the way `ciris-billing-proxy serve` serves them (`web.AppRunner`, whose default
keeps a handler running after its client disconnects; the test client's server cancels it instead,
which would hide the problem). Each client announces a 100-byte body, sends half of it, and closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, credit_gate, error_middleware, expect_continue, setup_billing
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.demo import create_demo_app
from ciris_billing_proxy.tools.users import UserStore

from .default_paths import INITIATE, LOGIN
from .providers import ShopProvider
from .repo_files import load_example
from .serving import get_credits

INTERACT = "/v1/agent/interact"


def _users() -> UserStore:
    users = UserStore()
    users.add("ann", "correct horse")
    return users


def demo(config: BillingConfig) -> web.Application:
    return create_demo_app(config, _users(), environ={})


def plain_host(config: BillingConfig) -> web.Application:
    """A host without the package's error middleware: the login route and billing routes only."""
    app = web.Application()
    setup_billing(app, config, provider=ShopProvider(), authenticate=_users().verify_login, environ={})
    return app


def host_reading_its_own_body(config: BillingConfig) -> web.Application:
    """A gated host handler that reads the body itself, behind `error_middleware()`."""

    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        return web.json_response({"echo": await request.json()})

    app = web.Application(middlewares=[error_middleware()])
    setup_billing(app, config, environ={})
    app.router.add_post(INTERACT, interact)
    return app


def readme_host(config: BillingConfig) -> web.Application:
    """The README's "Add it to your agent" setup, whose gated handler reads its body: no
    `error_middleware()`, so only the gate itself can keep a hang-up from being a 500."""

    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        return web.json_response({"echo": await request.json()})

    app = web.Application()
    setup_billing(app, config, environ={})
    app.router.add_post(INTERACT, interact, expect_handler=expect_continue)
    return app


def example_agent(config: BillingConfig) -> web.Application:
    app: web.Application = load_example("agent").create_app(config)
    return app


def protected_host(config: BillingConfig) -> web.Application:
    """A handler on a protected path (no gate) that reads its body, no `error_middleware()`."""

    async def interact(request: web.Request) -> web.Response:
        return web.json_response({"echo": await request.json()})

    app = web.Application()
    setup_billing(app, config.model_copy(update={"protected_paths": ("/v1/agent",)}), environ={})
    app.router.add_post(INTERACT, interact)
    return app


@asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[tuple[int, asyncio.Queue[str]]]:
    """Serve `app` on loopback; the queue receives the path of every POST about to be answered."""
    answered: asyncio.Queue[str] = asyncio.Queue()

    async def note(request: web.Request, _response: web.StreamResponse) -> None:
        if request.method == "POST":
            answered.put_nowait(request.path)

    app.on_response_prepare.append(note)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield port, answered
    finally:
        await runner.cleanup()


async def send_half_and_close(port: int, path: str, headers: dict[str, str], *, chunked: bool) -> None:
    """Announce 100 bytes (as `Content-Length` or as one chunk), send 50 and close."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    framing = "Transfer-Encoding: chunked\r\n\r\n64\r\n" if chunked else "Content-Length: 100\r\n\r\n"
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{lines}{framing}".encode()
        + b'{"message": "'
        + b"x" * 37
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize(
    ("make_app", "path", "signed_in"),
    [
        (demo, LOGIN, False),
        (demo, INTERACT, True),
        (plain_host, LOGIN, False),
        (plain_host, INITIATE, True),
        (host_reading_its_own_body, INTERACT, True),
        (readme_host, INTERACT, True),
        (example_agent, INTERACT, True),
        (protected_host, INTERACT, True),
    ],
    ids=[
        "demo-login",
        "demo-interact",
        "host-login",
        "host-initiate",
        "host-own-body",
        "readme-gated-no-error-middleware",
        "example-agent",
        "protected-path-no-error-middleware",
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_client_that_closes_mid_body_is_no_error(
    config: BillingConfig,
    tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
    make_app: Callable[[BillingConfig], web.Application],
    path: str,
    signed_in: bool,
    chunked: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = tokens.headers("zoe") if signed_in else {}
    async with served(make_app(config)) as (port, answered):
        before = await get_credits(port, tokens)
        for _ in range(3):
            await send_half_and_close(port, path, headers, chunked=chunked)
            assert await asyncio.wait_for(answered.get(), 30) == path
        assert await get_credits(port, tokens) == before, "an interaction that never happened was charged"

    records = [r for r in caplog.records if r.name.startswith(("ciris_billing_proxy", "aiohttp"))]
    assert not [r for r in records if r.levelno >= logging.WARNING], caplog.text
    assert not [r for r in records if r.exc_info], caplog.text
    assert "Unhandled error" not in caplog.text
    ours = [r for r in records if r.name == "ciris_billing_proxy"]
    assert len(ours) <= 3, "at most one line per disconnect"
    assert all(r.levelno == logging.DEBUG for r in ours)
    access = [r.getMessage() for r in records if r.name == "aiohttp.access" and path in r.getMessage()]
    assert len(access) == 3
    assert not [line for line in access if '" 500 ' in line], access


async def test_a_connection_error_of_the_handlers_own_is_still_a_logged_500(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def call_elsewhere(_request: web.Request) -> web.Response:
        raise ConnectionResetError("the model server hung up")

    app = web.Application(middlewares=[error_middleware()])
    app.router.add_get("/v1/agent/think", call_elsewhere)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR, logger="ciris_billing_proxy"):
        resp = await client.get("/v1/agent/think")
    assert resp.status == 500
    assert await resp.json() == {"detail": "Internal server error"}
    assert "Unhandled error in GET /v1/agent/think" in caplog.text
