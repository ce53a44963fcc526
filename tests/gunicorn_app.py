"""The app `tests/test_workers.py` runs under `gunicorn -k aiohttp.GunicornWebWorker`: the README's
"Add it to your agent" app, with one login (ann / pw) so logout can be tried. Every worker imports
it and builds its own app from the environment."""

from __future__ import annotations

from aiohttp import web

from ciris_billing_proxy import (
    AuthenticatedUser,
    BillingConfig,
    add_metrics_route,
    credit_gate,
    get_identity,
    setup_billing,
)


async def authenticate(username: str, password: str) -> AuthenticatedUser | None:
    return AuthenticatedUser("ann") if (username, password) == ("ann", "pw") else None


@credit_gate
async def interact(request: web.Request) -> web.Response:
    return web.json_response({"reply": f"Hello {get_identity(request).user_id}"})


app = web.Application()
setup_billing(app, BillingConfig.from_env(), authenticate=authenticate)
app.router.add_post("/v1/agent/interact", interact)
# One scrape reports every worker when PROMETHEUS_MULTIPROC_DIR is set (tests/test_metrics.py).
add_metrics_route(app)
