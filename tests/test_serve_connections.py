"""How `serve` treats connections: idle, silent and trickling ones are closed; hang-ups still pay.

The timeouts are checked against the real `serve` process over raw sockets. The hang-up rules are
checked with the runner `serve` builds (`cli.make_runner`), around a gated handler the test controls.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, Identity, credit_gate, setup_billing
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.cli import make_runner

from .providers import ShopProvider
from .serving import Server, clean_env, serve

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

USER = Identity("user-1", "local", "OBSERVER")
# Far beyond the 0.5 s idle timeout the server runs with, and far below aiohttp's own default
# (3,630 s): only the configured bound can close the connection in time.
PATIENCE = 15.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("serve")
    with serve(["--idle-timeout", "0.5", "--user", "ann:pw"], data_dir) as running:
        yield running


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def rest_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it closes the connection (a reset counts as closing)."""
    try:
        return await asyncio.wait_for(reader.read(), PATIENCE)
    except ConnectionResetError:
        return b""


async def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    reader, writer = await connect(server)
    try:
        assert await rest_until_closed(reader) == b""
    finally:
        writer.close()


async def test_a_request_head_trickled_byte_by_byte_is_closed(server: Server) -> None:
    reader, writer = await connect(server)

    async def trickle() -> None:
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        with contextlib.suppress(OSError):  # the server has hung up
            while True:  # never ends by itself: only the server can end this request
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.05)

    sending = asyncio.create_task(trickle())
    try:
        assert await rest_until_closed(reader) == b""  # closed without an answer
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_its_reply(server: Server) -> None:
    reader, writer = await connect(server)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PATIENCE)
        assert head.startswith(b"HTTP/1.1 200")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        assert b'"ok"' in await reader.readexactly(length)
        assert await rest_until_closed(reader) == b""
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def served_like_serve(app: web.Application) -> AsyncIterator[web.AppRunner]:
    runner = make_runner(app, idle_timeout=30)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner
    finally:
        await runner.cleanup()


async def hang_up(runner: web.AppRunner, raw: bytes, entered: asyncio.Future[web.Request]) -> None:
    """Send `raw`, wait until the handler has the request, close the socket, and wait until the
    server has seen the connection go."""
    port = runner.addresses[0][1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    request = await asyncio.wait_for(entered, PATIENCE)
    writer.close()
    await writer.wait_closed()

    async def gone() -> None:
        while request.transport is not None:  # noqa: ASYNC110 - aiohttp has no disconnect event
            await asyncio.sleep(0.01)

    await asyncio.wait_for(gone(), PATIENCE)


def gated_app(config: BillingConfig, provider: ShopProvider, handler: web.RequestHandler) -> web.Application:
    app = web.Application()
    setup_billing(app, config, provider=provider, environ={})
    app.router.add_post("/v1/agent/interact", handler)
    return app


async def test_a_client_that_hangs_up_mid_interaction_still_pays_under_serve(
    config: BillingConfig, tokens: TokenFactory
) -> None:
    provider = ShopProvider(credits=5)
    entered: asyncio.Future[web.Request] = asyncio.get_running_loop().create_future()
    release, finished = asyncio.Event(), asyncio.Event()
    ran_to_the_end = False

    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        nonlocal ran_to_the_end
        entered.set_result(request)
        await release.wait()
        ran_to_the_end = True
        return web.json_response({"reply": "done"})

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await interact(request)
        finally:
            finished.set()

    async with served_like_serve(gated_app(config, provider, handler)) as runner:
        token = tokens.headers()["Authorization"]
        raw = (
            f"POST /v1/agent/interact HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        await hang_up(runner, raw, entered)
        release.set()
        await asyncio.wait_for(finished.wait(), PATIENCE)
    assert ran_to_the_end
    assert provider.balance(USER) == 4
    assert "give_back" not in provider.calls


async def test_a_client_that_hangs_up_while_sending_its_body_gets_the_use_back(
    config: BillingConfig, tokens: TokenFactory
) -> None:
    provider = ShopProvider(credits=5)
    entered: asyncio.Future[web.Request] = asyncio.get_running_loop().create_future()
    finished = asyncio.Event()

    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        entered.set_result(request)
        await request.read()  # fails: the client left before the body was complete
        return web.json_response({"reply": "unreachable"})

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await interact(request)
        finally:
            finished.set()

    async with served_like_serve(gated_app(config, provider, handler)) as runner:
        token = tokens.headers()["Authorization"]
        raw = (
            f"POST /v1/agent/interact HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"message":'
        ).encode()
        await hang_up(runner, raw, entered)
        await asyncio.wait_for(finished.wait(), PATIENCE)
    assert provider.balance(USER) == 5
    assert provider.calls["give_back"] == 1


def test_the_idle_timeout_option_is_checked(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ciris_billing_proxy",
            "serve",
            "--idle-timeout",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "--idle-timeout: must be more than 0" in result.stderr
