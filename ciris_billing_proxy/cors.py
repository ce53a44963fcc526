"""Pages on other origins calling the billing routes (`BillingConfig.cors_origins`), with aiohttp-cors.

Nothing is installed when no origin is configured, so an agent without CORS pays nothing per request.
With origins, aiohttp-cors answers preflights (which pass the token check: `auth.is_preflight`) and adds
`Access-Control-Allow-Origin` to the replies of the listed origins, errors included, so a page reads a
401 or 402 as such instead of a network failure. Credentials are bearer tokens, never cookies, so
`Access-Control-Allow-Credentials` is never sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from aiohttp import web

from .id_token import APPLE_HEADER, GOOGLE_HEADER

#: Request headers a page may send: the token, the JSON body's type, a purchase's idempotency key and
#: the native apps' ID tokens.
ALLOW_HEADERS: Final = ("Authorization", "Content-Type", "Idempotency-Key", GOOGLE_HEADER, APPLE_HEADER)
#: Reply headers a page may read beyond the CORS-safelisted ones: how long to wait after a 429 or 503.
EXPOSE_HEADERS: Final = ("Retry-After",)
ALLOW_METHODS: Final = ("GET", "POST")
#: Seconds a browser may reuse a preflight's answer.
MAX_AGE: Final = 600


def allow_origins(
    app: web.Application, resources: Iterable[web.AbstractResource], origins: tuple[str, ...]
) -> None:
    """Let pages on `origins` (`*`: any) call `resources` of `app`; nothing at all without origins."""
    if not origins:
        return
    import aiohttp_cors  # only agents that use it load it

    # ResourceOptions.__init__ has no annotations; its arguments are checked by aiohttp-cors itself.
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
        allow_methods=ALLOW_METHODS,
        max_age=MAX_AGE,
    )
    hooks = len(app.on_response_prepare)
    cors = aiohttp_cors.CorsConfig(app, defaults=dict.fromkeys(origins, options))
    covered = frozenset(resources)
    for resource in covered:
        cors.add(resource)
    # aiohttp-cors adds one reply hook that looks up the route's settings on every reply, though it
    # does nothing to a request without `Origin` (CORS 6.1.1): same-origin requests skip it below.
    (set_cors_headers,) = app.on_response_prepare[hooks:]
    del app.on_response_prepare[hooks:]

    async def on_reply(request: web.Request, response: web.StreamResponse) -> None:
        if request.match_info.route.resource in covered:
            # The reply depends on `Origin` (allowed or not), so a cache must not hand one origin's
            # copy to another. aiohttp-cors leaves this out.
            response.headers.add("Vary", "Origin")
            if "Origin" in request.headers:
                await set_cors_headers(request, response)

    app.on_response_prepare.append(on_reply)
