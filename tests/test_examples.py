"""The examples in `examples/` work as written."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig, Identity
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.tools.demo import create_demo_app
from ciris_billing_proxy.tools.users import UserStore

from .default_paths import CREDITS, LOGIN
from .repo_files import load_example


async def test_example_agent(aiohttp_client: Any, config: BillingConfig) -> None:
    client = await aiohttp_client(load_example("agent").create_app(config))
    login = await client.post(LOGIN, json={"username": "ann", "password": "change-me"})
    auth = {"Authorization": f"Bearer {(await login.json())['access_token']}"}
    resp = await client.post("/v1/agent/interact", json={"message": "hi"}, headers=auth)
    assert await resp.json() == {"reply": "Hello ann, you said: hi"}
    assert (await client.post("/v1/agent/interact", data=b"nope", headers=auth)).status == 422
    credits = await (await client.get(CREDITS, headers=auth)).json()
    assert credits["free_uses_remaining"] == 9


async def test_example_client_buys_credits(
    aiohttp_client: Any,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    users = UserStore()
    users.add("ann", "pw", email="ann@example.com")
    server = await aiohttp_client(create_demo_app(ciris_billing_config, users, environ={}))
    url = str(server.make_url("")).rstrip("/")
    example = load_example("client")
    assert await example.main(url, "ann", "pw") == "no purchase needed"
    ciris_fake_backend.use_up_free_uses("oauth:local", "test-agent:ann")
    server.app[SERVICE_KEY].invalidate(Identity("ann", "local", "OBSERVER"))

    async def pay() -> None:
        while not ciris_fake_backend.ledger.payments:  # noqa: ASYNC110 - the fake runs on another thread
            await asyncio.sleep(0.02)
        ciris_fake_backend.confirm_payment(next(iter(ciris_fake_backend.ledger.payments)))

    paying = asyncio.ensure_future(pay())
    assert await example.main(url, "ann", "pw", interval=0.05) == "20 uses added; 20 paid uses left"
    await paying
    assert "0 uses left: 0 free, 0 paid (plan: free)" in capsys.readouterr().out
    assert await example.main(url, "ann", "pw") == "no purchase needed"
    assert "20 uses left: 0 free, 20 paid (plan: free)" in capsys.readouterr().out
