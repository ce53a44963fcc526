"""A minimal agent with billing, in one file.

    CIRIS_JWT_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(48))') python examples/agent.py

Then log in as ann / change-me at POST /v1/auth/login and call POST /v1/agent/interact.
"""

from aiohttp import web

from ciris_billing_proxy import BillingConfig, credit_gate, expect_continue, get_identity, setup_billing
from ciris_billing_proxy.tools.users import UserStore


@credit_gate  # takes one use before the handler runs; gives it back if the handler fails
async def interact(request: web.Request) -> web.Response:
    identity = get_identity(request)  # the same verified user the billing routes see
    try:
        message = str((await request.json())["message"])
    except (ValueError, KeyError, TypeError):
        # A 4xx from a gated handler gives the use back, so bad input costs nothing.
        return web.json_response({"detail": 'Send {"message": "..."}'}, status=422)
    return web.json_response({"reply": f"Hello {identity.user_id}, you said: {message}"})


def create_app(config: BillingConfig) -> web.Application:
    users = UserStore()  # keeps scrypt hashes only; bring your own user system in production
    users.add("ann", "change-me", email="ann@example.com")

    app = web.Application()
    # The one call: /v1/api/billing/* with JWT auth, /v1/auth/{login,logout,refresh,me}, provider lifecycle.
    setup_billing(app, config, authenticate=users.verify_login)
    # expect_continue: an unsupported `Expect` header is a JSON 417, like every billing error.
    app.router.add_post("/v1/agent/interact", interact, expect_handler=expect_continue)
    return app


if __name__ == "__main__":
    web.run_app(create_app(BillingConfig.from_env()), host="127.0.0.1", port=8000)
