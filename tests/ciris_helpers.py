"""Helpers for tests of the `ciris` provider against the fake backend (fixtures come from the
package's own pytest plugin: ciris_fake_backend, ciris_billing_config, ciris_tokens)."""

from __future__ import annotations

from aiohttp import web

from ciris_billing_proxy import credit_gate

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
