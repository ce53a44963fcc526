"""The examples in `examples/` work as written."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from ciris_billing_proxy import BillingConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_agent(aiohttp_client: Any, config: BillingConfig) -> None:
    client = await aiohttp_client(load("agent").create_app(config))
    login = await client.post("/v1/auth/login", json={"username": "ann", "password": "change-me"})
    auth = {"Authorization": f"Bearer {(await login.json())['access_token']}"}
    resp = await client.post("/v1/agent/interact", json={"message": "hi"}, headers=auth)
    assert await resp.json() == {"reply": "Hello ann, you said: hi"}
    assert (await client.post("/v1/agent/interact", data=b"nope", headers=auth)).status == 422
    credits = await (await client.get("/v1/api/billing/credits", headers=auth)).json()
    assert credits["free_uses_remaining"] == 9
