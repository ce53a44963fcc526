"""The floor, run the way a user runs an aiohttp app: `python -m bench.bare A|A0 PORT [--access-log]`.

  A   a handler answering the `/credits` JSON of `serve` (the `simple` provider, nothing used yet),
      encoded per request with `web.json_response`
  A0  the same bytes, encoded once at startup

`web.run_app` with its defaults, so aiohttp's access logger is there as it is for any app; with
`--access-log` logging is configured at INFO, so it writes one line per request (to stderr), the
work `serve` does when its own access log is on.
"""

from __future__ import annotations

import json
import logging
import sys

from aiohttp import web

from .common import CREDITS_PATH

#: What `serve --provider-option free_uses=1000000` answers a user who has used nothing.
CREDITS_JSON = {
    "has_credit": True,
    "credits_remaining": 0,
    "free_uses_remaining": 1_000_000,
    "total_uses": 0,
    "plan_name": "free",
    "purchase_required": False,
    "purchase_options": None,
}


def build(scenario: str) -> web.Application:
    app = web.Application()
    if scenario == "A":

        async def credits(_request: web.Request) -> web.Response:
            return web.json_response(CREDITS_JSON)

        app.router.add_get(CREDITS_PATH, credits)
    elif scenario == "A0":
        body = json.dumps(CREDITS_JSON).encode()

        async def credits_bytes(_request: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        app.router.add_get(CREDITS_PATH, credits_bytes)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    return app


def main(argv: list[str]) -> None:
    scenario, port = argv[0], int(argv[1])
    if "--access-log" in argv:
        logging.basicConfig(level=logging.INFO)
    web.run_app(build(scenario), host="127.0.0.1", port=port, print=lambda _: print("READY", flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])
