"""Helpers for tests of the `ciris` provider against the fake backend (fixtures come from the
package's own pytest plugin: ciris_fake_backend, ciris_billing_config, ciris_tokens)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ciris_billing_proxy import BillingConfig, credit_gate
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .default_paths import CREDITS

INTERACT = "/v1/agent/interact"


def agent_routes(app: web.Application) -> None:
    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("fail"):
            return web.json_response({"detail": "model down"}, status=502)
        return web.json_response({"ok": True})

    app.router.add_post(INTERACT, interact)


def who(user_id: str, namespace: str = "local", agent_id: str = "test-agent") -> tuple[str, str]:
    """The backend identity of a user: the agent's own users carry the agent's id."""
    return f"oauth:{namespace}", f"{agent_id}:{user_id}" if namespace == "local" else user_id


def with_options(config: BillingConfig, **options: Any) -> BillingConfig:
    """`config` with these provider options changed and the others kept."""
    return config.model_copy(update={"provider_options": {**config.provider_options, **options}})


async def paid_user(
    client: Any, fake: FakeBillingBackend, tokens: TokenFactory, name: str, paid: int, **claims: Any
) -> dict[str, str]:
    """The auth headers of a user with no free uses left and `paid` paid credits."""
    auth = tokens.headers(name, **claims)
    assert (await client.get(CREDITS, headers=auth)).status == 200  # creates the account
    fake.use_up_free_uses(*who(name))
    fake.grant(*who(name), paid)
    return auth


async def until(condition: Callable[[], object], seconds: float = 3.0) -> None:
    """Wait for `condition` to hold; give up quietly after `seconds` (the caller asserts)."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
