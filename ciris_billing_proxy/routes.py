"""The billing routes under the prefix. Thin: parse, call the service, reply.

Every handler runs behind the auth middleware (so `VERIFIED_KEY` is always set) and the error
middleware (so a `BillingError` raised here or by the service becomes its HTTP reply there).
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from .auth import identity_of_request
from .bodies import expect_continue, read_model
from .errors import BillingDisabled, PaymentNotFound, http_error
from .keys import VERIFIED_KEY
from .models import PurchaseRequest
from .service import BillingService

#: Stripe ids are short `pi_...` tokens; anything outside this alphabet cannot be one of ours.
PAYMENT_ID: Final = re.compile(r"^[A-Za-z0-9_\-]{1,255}$")
IDEMPOTENCY_KEY: Final = re.compile(r"^[A-Za-z0-9_\-.:]{1,128}$")
MAX_OFFSET: Final = 1_000_000_000


def json_reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type="application/json")


class BillingRoutes:
    """The handlers, bound to their service (no per-request lookup through the app chain)."""

    def __init__(self, service: BillingService) -> None:
        self.service = service
        self._catch_all: list[web.AbstractResource] = []

    async def get_credits(self, request: web.Request) -> web.Response:
        body = await self.service.credit_reply(request[VERIFIED_KEY][1])
        return web.Response(body=body, content_type="application/json")

    async def capabilities(self, request: web.Request) -> web.Response:
        return json_reply(self.service.capabilities())

    async def initiate_purchase(self, request: web.Request) -> web.Response:
        service = self._selling()
        config = service.config
        body = await read_model(
            request,
            PurchaseRequest,
            config.max_body_bytes,
            time_limit=config.body_timeout_seconds,
            empty_ok=True,
        )
        key = request.headers.get("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            raise http_error(400, "Idempotency-Key must be 1-128 letters, digits or -_.:")
        return json_reply(await service.initiate_purchase(request[VERIFIED_KEY][1], body.return_url, key))

    async def purchase_status(self, request: web.Request) -> web.Response:
        service = self._selling()
        payment_id = request.match_info["payment_id"]
        if not PAYMENT_ID.match(payment_id):
            raise PaymentNotFound
        return json_reply(await service.purchase_status(request[VERIFIED_KEY][1], payment_id))

    async def transactions(self, request: web.Request) -> web.Response:
        limit = _int_query(request, "limit", 50, low=1, high=100)
        offset = _int_query(request, "offset", 0, low=0, high=MAX_OFFSET)
        return json_reply(await self.service.transactions(request[VERIFIED_KEY][1], limit, offset))

    async def expect_authenticated(self, request: web.Request) -> None:
        """`Expect:` is answered before middlewares run: check the token before inviting an upload."""
        identity_of_request(request, self.service.verifier)  # a 401 here is sent instead of 100
        await expect_continue(request)

    def answer_unmatched(self, router: web.UrlDispatcher, prefix: str) -> None:
        """Route the prefix itself and every path below it that no billing route serves to
        `unmatched`. aiohttp tries the most specific path first, so the billing routes still win."""
        for path in (prefix, f"{prefix}/{{tail:.*}}"):
            resource = router.add_route(
                "*", path, self.unmatched, expect_handler=self.expect_authenticated
            ).resource
            assert resource is not None
            self._catch_all.append(resource)

    async def unmatched(self, request: web.Request) -> web.Response:
        """The JSON 404 or 405 for a path or method no billing route serves. Answered by a route
        rather than left to aiohttp, whose own 404/405 get its default `Expect:` handling (a
        `100 Continue` before the token check, a plain-text 417)."""
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource not in self._catch_all:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            raise http_error(405, "Method Not Allowed", {"Allow": ",".join(sorted(allowed))})
        raise http_error(404, "Not Found")

    def _selling(self) -> BillingService:
        """The service, if its provider sells credits; checked before the body or id is even read."""
        if not self.service.provider.purchases_enabled:
            raise BillingDisabled
        return self.service


def _int_query(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    """A bounded integer query parameter; out of range is an error, never silently clamped."""
    raw = request.query.get(name)
    if raw is None:
        return default
    digits = raw.lstrip("0") or ("0" if raw else "")
    # Plain ASCII digits only (no signs, spaces or exponents), and short enough to convert cheaply.
    value = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 12 else -1
    if not low <= value <= high:
        raise http_error(422, f"Invalid request: {name} must be a whole number from {low} to {high}")
    return value


def add_routes(
    router: web.UrlDispatcher,
    service: BillingService,
    prefix: str = "",
    *,
    public: set[Handler],
    own_router: bool = False,
) -> web.AbstractResource:
    """Add the billing routes to `router`, each path under `prefix` (empty inside the sub-app).
    The handlers of routes that need no token are added to `public`, which the token check skips.

    Every route checks the token before granting `Expect: 100-continue`. With `own_router` (the
    billing sub-app's router, which serves nothing else) every other path and method is answered
    too, with the same `Expect:` handling and a JSON 404/405.

    Returns the `/credits` resource: mounting the application prefixes it like every other one,
    which is how `setup_billing` learns where the routes ended up.
    """
    routes = BillingRoutes(service)
    expect = routes.expect_authenticated
    credits = router.add_get(f"{prefix}/credits", routes.get_credits, expect_handler=expect).resource
    router.add_get(f"{prefix}/capabilities", routes.capabilities, expect_handler=expect)
    router.add_post(f"{prefix}/purchase/initiate", routes.initiate_purchase, expect_handler=expect)
    router.add_get(f"{prefix}/purchase/status/{{payment_id}}", routes.purchase_status, expect_handler=expect)
    router.add_get(f"{prefix}/transactions", routes.transactions, expect_handler=expect)
    if own_router:
        routes.answer_unmatched(router, prefix)
    assert credits is not None  # a route added by path always has its resource
    return credits
