"""`Expect:` on the host's gated routes: aiohttp answers it before any middleware runs, so only the
route's expect handler can make its errors JSON like every other error there."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ciris_billing_proxy import BillingConfig, credit_gate, expect_continue, setup_billing
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.demo import create_demo_app
from ciris_billing_proxy.tools.users import UserStore

INTERACT = "/v1/agent/interact"


async def test_the_demo_answers_an_unknown_expectation_in_json(
    aiohttp_client: Any, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await aiohttp_client(create_demo_app(config, UserStore(), environ={}))
    resp = await client.post(INTERACT, json={"message": "hi"}, headers={**tokens.headers(), "Expect": "foo"})
    assert resp.status == 417
    assert resp.content_type == "application/json"
    assert await resp.json() == {"detail": "Only 'Expect: 100-continue' is supported"}
    resp = await client.post(INTERACT, json={"message": "hi"}, headers=tokens.headers(), expect100=True)
    assert resp.status == 200
    assert (await resp.json())["reply"] == "You said: hi"


async def test_a_host_route_with_the_exported_expect_handler(
    aiohttp_client: Any, config: BillingConfig, tokens: TokenFactory
) -> None:
    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        return web.json_response(await request.json())

    app = web.Application()
    setup_billing(app, config, environ={})
    app.router.add_post(INTERACT, interact, expect_handler=expect_continue)
    client = await aiohttp_client(app)

    async def first_reply(expect: str) -> bytes:
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(
            f"POST {INTERACT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {tokens.token()}\r\nContent-Length: 2\r\n"
            f"Expect: {expect}\r\n\r\n".encode()
        )
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(4096), 30)
        writer.close()
        await writer.wait_closed()
        return reply

    assert (await first_reply("100-continue")).startswith(b"HTTP/1.1 100 Continue")
    refused = await first_reply("foo")
    assert refused.startswith(b"HTTP/1.1 417")
    assert b"application/json" in refused
    assert refused.endswith(b'{"detail": "Only \'Expect: 100-continue\' is supported"}')
