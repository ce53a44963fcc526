"""One benchmark server process: `python -m bench.servers SCENARIO [FAKE_URL FAKE_KEY]`.

Pinned to core 0. Prints `READY <port>` once listening, then serves until killed.
  A  a bare aiohttp handler returning the /credits JSON: no auth, no plugin (the floor)
  A0 the same, with the JSON encoded once at startup (a stricter floor: nothing per request)
  B  the plugin's authenticated GET /credits, `simple` provider
  C  the same with the `ciris` provider against the fake backend
  D  the credit-gated demo endpoint, POST /v1/agent/interact, `simple` provider
  DP the same with the usage ledger in PostgreSQL (`python -m bench.servers DP DATABASE_URL`)
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from ciris_billing_proxy import BillingConfig, JWTConfig, setup_billing
from ciris_billing_proxy.tools.demo import create_demo_app
from ciris_billing_proxy.tools.users import UserStore

from .common import CREDITS_PATH, SECRET, pin

CREDITS_JSON = {
    "has_credit": True,
    "credits_remaining": 0,
    "free_uses_remaining": 10,
    "total_uses": 0,
    "plan_name": "free",
    "purchase_required": False,
    "purchase_options": None,
}


def build(scenario: str, argv: list[str]) -> web.Application:
    data_dir = Path(tempfile.mkdtemp(prefix="ciris-bench-"))
    jwt = JWTConfig(secret=SECRET)
    if scenario == "A":
        app = web.Application()

        async def credits(request: web.Request) -> web.Response:
            return web.json_response(CREDITS_JSON)

        app.router.add_get(CREDITS_PATH, credits)
        return app
    if scenario == "A0":
        app = web.Application()
        body = json.dumps(CREDITS_JSON).encode()

        async def credits_bytes(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        app.router.add_get(CREDITS_PATH, credits_bytes)
        return app
    if scenario == "B":
        app = web.Application()
        setup_billing(app, BillingConfig(jwt=jwt, data_dir=data_dir), environ={})
        return app
    if scenario == "C":
        fake_url, fake_key = argv
        config = BillingConfig(
            jwt=jwt,
            data_dir=data_dir,
            provider="ciris",
            provider_options={"api_url": fake_url, "api_key": fake_key},
        )
        app = web.Application()
        setup_billing(app, config, environ={})
        return app
    if scenario in ("D", "DP"):
        config = BillingConfig(
            jwt=jwt,
            data_dir=data_dir,
            provider_options={"free_uses": 1_000_000},
            database_url=argv[0] if scenario == "DP" else None,
        )
        return create_demo_app(config, UserStore(), environ={})
    raise SystemExit(f"unknown scenario {scenario}")


async def serve(app: web.Application) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print("READY", runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    pin(0)
    asyncio.run(serve(build(sys.argv[1], sys.argv[2:])))
