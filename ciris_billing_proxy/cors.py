"""Pages on other origins calling the billing routes (`BillingConfig.cors_origins`).

Nothing is installed when no origin is configured, so an agent without CORS pays nothing per request.
With origins, aiohttp-cors answers the preflights (which pass the token check: `auth.is_preflight`)
and `cors_middleware` labels the replies: `Vary: Origin` on each, and for a listed origin
`Access-Control-Allow-Origin` and the readable `Retry-After`, errors included, so a page reads a 401 or
402 as such instead of a network failure. Credentials are bearer tokens, never cookies, so
`Access-Control-Allow-Credentials` is never sent.

The replies are labelled in the billing middleware rather than by aiohttp-cors's reply hook, which
looks up the route's settings on every reply, same-origin ones included: that hook made the cached
`GET /credits` about 15% dearer (`bench.instructions`), the middleware about 2%, near the noise.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .id_token import APPLE_HEADER, GOOGLE_HEADER

#: Request headers a page may send: the token, the JSON body's type, a purchase's idempotency key and
#: the native apps' ID tokens.
ALLOW_HEADERS: Final = ("Authorization", "Content-Type", "Idempotency-Key", GOOGLE_HEADER, APPLE_HEADER)
#: Reply headers a page may read beyond the CORS-safelisted ones: how long to wait after a 429 or 503.
EXPOSE_HEADERS: Final = ("Retry-After",)
ALLOW_METHODS: Final = ("GET", "POST")
#: Seconds a browser may reuse a preflight's answer.
MAX_AGE: Final = 600


def cors_middleware(
    inner: Middleware, resources: Container[web.AbstractResource], origins: tuple[str, ...]
) -> Middleware:
    """`inner` (the billing error middleware), labelling the replies of `resources` for `origins`
    (`*`: any); `inner` itself when there are none. `resources` may be filled after this call."""
    if not origins:
        return inner
    allowed = None if "*" in origins else frozenset(origins)
    exposed = ",".join(EXPOSE_HEADERS)

    def label(request: web.Request, reply: web.StreamResponse) -> None:
        if request.match_info.route.resource not in resources:
            return
        # The reply depends on `Origin` (allowed or not), so a cache must not hand one origin's copy
        # to another.
        reply.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin")
        # A preflight's reply (OPTIONS) is aiohttp-cors's, refusals included.
        if origin is not None and request.method != "OPTIONS" and (allowed is None or origin in allowed):
            reply.headers["Access-Control-Allow-Origin"] = origin
            reply.headers["Access-Control-Expose-Headers"] = exposed

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            reply = await inner(request, handler)
        except web.HTTPException as exc:  # the error replies, JSON by now
            label(request, exc)
            raise
        label(request, reply)
        return reply

    return middleware


def allow_preflights(
    app: web.Application, resources: Iterable[web.AbstractResource], origins: tuple[str, ...]
) -> None:
    """Answer CORS preflights for `resources` of `app` from `origins`; nothing without origins."""
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
    for resource in resources:
        cors.add(resource)
    # Its reply hook is replaced by `cors_middleware` (see above); its preflight routes stay.
    del app.on_response_prepare[hooks:]
