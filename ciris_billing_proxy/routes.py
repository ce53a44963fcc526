"""The billing routes under the prefix. Thin: parse, call the service, reply.

Every handler but the API description's runs behind the token check (so `VERIFIED_KEY` is always
set; `CachedCredits` answers a cached `GET /credits` in front of it, and checks the token itself)
and the error middleware (so a `BillingError` raised here or by the service becomes its HTTP
reply there). Each route is an `Operation` declared below, which the OpenAPI document is built from.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Final, TypeVar

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from .auth import identity_of_request
from .bodies import expect_continue, read_model
from .config import ConfigError
from .credit_routes import CREDIT_OPERATIONS, add_credit_routes
from .errors import (
    BILLING_DISABLED,
    CATCH_ALLS,
    BillingDisabled,
    IdTokenRequired,
    PaymentNotFound,
    RouteGuards,
    http_error,
    unguarded,
    unmatched_reply,
)
from .id_token import (
    APPLE_HEADER,
    GOOGLE_HEADER,
    MISSING,
    IdToken,
    id_token_as,
    id_token_scope,
    user_id_token,
)
from .identity import Identity
from .keys import VERIFIED_KEY
from .models import (
    AppStorePurchase,
    Capabilities,
    CreditStatus,
    GooglePlayPurchase,
    PurchaseInitiated,
    PurchaseRequest,
    PurchaseStatus,
    StoreVerification,
    TransactionPage,
)
from .operations import (
    BEARER_ERRORS,
    BODY_ERRORS,
    EXPECT_FAILED,
    PROVIDER_FAILED,
    SELLING,
    IntQuery,
    Operation,
    TextParam,
)
from .ops.request_id import HEADER as REQUEST_ID_HEADER
from .ops.request_id import assign_request_id, current_request_id
from .paths import (
    APP_STORE_ROUTE,
    CAPABILITIES_ROUTE,
    CREDITS_ROUTE,
    GOOGLE_PLAY_ROUTE,
    INITIATE_ROUTE,
    STATUS_ROUTE,
    TRANSACTIONS_ROUTE,
)
from .providers.base import CreditProvider, ProviderRoute
from .service import BillingService
from .ui import SERVED, UIFiles

M = TypeVar("M", bound=BaseModel)

#: Stripe ids are short `pi_...` tokens; anything outside this alphabet cannot be one of ours.
PAYMENT_ID: Final = TextParam(
    "payment_id",
    re.compile(r"[A-Za-z0-9_\-]{1,255}"),
    "The `payment_id` from `purchase/initiate`; any other id, or another user's, is a 404.",
)
IDEMPOTENCY_KEY: Final = TextParam(
    "Idempotency-Key",
    re.compile(r"[A-Za-z0-9_\-.:]{1,128}"),
    "Repeating a purchase with the same key (per user) returns the same payment instead of a new one.",
)
LIMIT: Final = IntQuery("limit", 50, 1, 100, "Transactions per page.")
OFFSET: Final = IntQuery("offset", 0, 0, 1_000_000_000, "Transactions to skip, newest first.")
BAD_IDEMPOTENCY_KEY: Final = "Idempotency-Key must be 1-128 letters, digits or -_.:"
#: The ID-token headers are not declared as parameters: only a provider in ID-token mode reads them
#: (`/capabilities` says `charges: false` then), and every other agent ignores them.
NO_ID_TOKEN: Final = (
    "no valid bearer token (missing, malformed, expired, revoked or badly signed); or the provider "
    f"needs the user's Google or Apple ID token (`{GOOGLE_HEADER}` or `{APPLE_HEADER}` header, beside "
    "the bearer token) and none was sent, or its backend refused it"
)
AS_USER_ERRORS: Final = {**BEARER_ERRORS, 401: NO_ID_TOKEN}
STORE_REFUSED: Final = (
    "A purchase the store or backend refuses (invalid, unknown product) is still a 200, with "
    "`success: false` and a readable `error`: the mobile apps read those fields. So is a store the "
    "provider does not redeem (`error`: `Billing not enabled for this agent`; `/capabilities` says it "
    "is off). A repeated purchase answers `already_processed: true` and adds nothing."
)

CREDITS: Final = Operation(
    "getCredits",
    "GET",
    CREDITS_ROUTE,
    "The caller's credit: free and paid uses left, and what a purchase costs when one is needed.",
    CreditStatus,
    {**AS_USER_ERRORS, 503: PROVIDER_FAILED},
    "billing",
)
CAPABILITIES: Final = Operation(
    "getCapabilities",
    "GET",
    CAPABILITIES_ROUTE,
    "What the provider offers (purchases, a transaction history, app store purchases, whether the gate "
    "charges), so a UI can hide what it cannot do.",
    Capabilities,
    {**BEARER_ERRORS, 503: "the provider's declaration is broken"},
    "billing",
)
INITIATE: Final = Operation(
    "initiatePurchase",
    "POST",
    INITIATE_ROUTE,
    "Start a purchase: a Stripe PaymentIntent whose `client_secret` the UI confirms with Stripe.js.",
    PurchaseInitiated,
    {
        **AS_USER_ERRORS,
        **BODY_ERRORS,
        400: "the body is not JSON, a bad `Idempotency-Key`, or the provider refused the purchase "
        "(e.g. no email address on the account)",
        403: SELLING,
        429: "the user started the provider's limit of new purchases within its window (`ciris`: "
        "`purchase_max_per_user`); see `Retry-After`",
        503: PROVIDER_FAILED,
    },
    "billing",
    body=PurchaseRequest,
    headers=(IDEMPOTENCY_KEY,),
    links={"getPurchaseStatus": {"payment_id": "$response.body#/payment_id"}},
)
STATUS: Final = Operation(
    "getPurchaseStatus",
    "GET",
    STATUS_ROUTE + "{payment_id}",
    "A purchase's state; poll until `succeeded`, `failed`, `canceled` or `unknown`.",
    PurchaseStatus,
    {**AS_USER_ERRORS, 403: SELLING, 404: "no such payment of this user's", 503: PROVIDER_FAILED},
    "billing",
    path_params=(PAYMENT_ID,),
)
TRANSACTIONS: Final = Operation(
    "getTransactions",
    "GET",
    TRANSACTIONS_ROUTE,
    "The caller's charges and credits, newest first, a page at a time.",
    TransactionPage,
    {**AS_USER_ERRORS, 422: "`limit` or `offset` out of range", 503: PROVIDER_FAILED},
    "billing",
    query=(LIMIT, OFFSET),
)
GOOGLE_PLAY: Final = Operation(
    "verifyGooglePlay",
    "POST",
    GOOGLE_PLAY_ROUTE,
    "Redeem a Google Play purchase: its credits are added to the caller's account, once. " + STORE_REFUSED,
    StoreVerification,
    {
        **AS_USER_ERRORS,
        **BODY_ERRORS,
        503: PROVIDER_FAILED,
    },
    "billing",
    body=GooglePlayPurchase,
    body_required=True,
)
APP_STORE: Final = Operation(
    "verifyAppStore",
    "POST",
    APP_STORE_ROUTE,
    "Redeem an App Store (StoreKit) transaction: its credits are added to the caller's account, once. "
    + STORE_REFUSED,
    StoreVerification,
    {
        **AS_USER_ERRORS,
        **BODY_ERRORS,
        503: PROVIDER_FAILED,
    },
    "billing",
    body=AppStorePurchase,
    body_required=True,
)
OPENAPI: Final = Operation(
    "getOpenAPI",
    "GET",
    "/openapi.json",
    "This document: the API as OpenAPI 3.1. Public: no token needed.",
    None,
    {417: EXPECT_FAILED},
    "billing",
    bearer=False,
)
UI_FILE: Final = Operation(
    "getUIFile",
    "GET",
    "/ui/{name}",
    "A file of the billing UI kit: `billing.js` (the ES module) or `billing.d.ts` (its types). Public, "
    "cacheable (`ETag`, `Cache-Control`), readable from any origin. Served unless `serve_ui` is off.",
    None,
    {404: "no such file", 417: EXPECT_FAILED},
    "ui",
    path_params=(TextParam("name", re.compile("|".join(map(re.escape, SERVED))), "The file's name."),),
    bearer=False,
    media_types=tuple(sorted(set(SERVED.values()))),
    bodiless={304: "the file has not changed since the `ETag` sent in `If-None-Match`"},
)
#: Every billing route, in the order of the document; `UI_FILE` only with `serve_ui`.
BILLING_OPERATIONS: Final = (
    CREDITS,
    CAPABILITIES,
    INITIATE,
    STATUS,
    TRANSACTIONS,
    GOOGLE_PLAY,
    APP_STORE,
    OPENAPI,
    UI_FILE,
)


def json_reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type="application/json")


#: A store the provider does not redeem: a 200 the apps read (they show any non-2xx as a raw "API
#: error"), as CIRIS answers; `/capabilities` says the store is off. A malformed body is still its 4xx.
STORE_OFF_BODY: Final = StoreVerification(
    success=False, credits_added=0, new_balance=0, already_processed=False, error=BILLING_DISABLED
)


def _store_off() -> web.Response:
    return json_reply(STORE_OFF_BODY)


class CachedCredits:
    """`GET /credits` answered in one step when the caller's token and credit are both cached and
    good: the route's own handler, in front of the guarded one (`errors.RouteGuards`), which
    answers every other case. It does what that path does for a hit, in one frame of C calls and
    three small ones (about a tenth of a cached read's instructions, `bench.instructions` B;
    docs/performance.md): the token checked
    (`TokenVerifier.cached_identity`: expiry and revocation included), the request id made current
    and echoed, the bytes cached when the credit was loaded sent, the answer counted for the
    metrics. Anything else (no single `Authorization` header, a token not cached or refused, a
    credit not cached, a provider that wants the user's ID token) goes to the guarded handler,
    which checks it all again and answers errors in JSON. The identity is not put on the request
    (`VERIFIED_KEY`): nothing runs after this handler that reads it, and `get_identity` verifies
    again (from the cache) where it is missing."""

    __slots__ = ("_asks_id_token", "_counted", "_guarded", "_identity", "_peek", "_provider", "_requests")

    def __init__(self, service: BillingService, guarded: Handler) -> None:
        # What the service holds for its lifetime, bound once: no attribute chain per request.
        self._provider = service.provider
        self._identity = service.verifier.cached_identity
        self._peek = service.cache.peek
        self._requests = service.counts.requests
        self._guarded = guarded
        self._counted: tuple[object, int] | None = None
        # A provider whose class keeps the base's `id_token_required` (always False) never wants
        # the user's ID token: it is not asked on every request.
        self._asks_id_token = inspect.getattr_static(
            type(service.provider), "id_token_required"
        ) is not inspect.getattr_static(CreditProvider, "id_token_required")

    def count_as(self, route: web.AbstractRoute) -> None:
        """The route whose 200s this handler counts (known once the route is added)."""
        self._counted = (route, 200)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        authorization = request.headers.getall(hdrs.AUTHORIZATION, ())
        counted = self._counted
        if (
            len(authorization) == 1
            and counted is not None
            and not (self._asks_id_token and self._wants_id_token())
        ):
            identity = self._identity(authorization[0])
            credit = None if identity is None else self._peek(identity)
            if credit is not None:
                rid = current_request_id.get() or assign_request_id(request)
                # Both headers given at once: one multidict built, no `headers` property and update.
                response = web.Response(
                    body=credit.body, headers={hdrs.CONTENT_TYPE: "application/json", REQUEST_ID_HEADER: rid}
                )
                requests = self._requests
                try:  # cheaper than .get(): after the first answer the key is always there
                    requests[counted] += 1
                except KeyError:
                    requests[counted] = 1
                return response
        return await self._guarded(request)

    def _wants_id_token(self) -> bool:
        try:
            return self._provider.id_token_required
        except Exception:  # a provider's bug: the guarded handler's to answer
            return True


class BillingRoutes:
    """The handlers, bound to their service (no per-request lookup through the app chain)."""

    def __init__(self, service: BillingService) -> None:
        self.service = service

    async def get_credits(self, request: web.Request) -> web.Response:
        identity = request[VERIFIED_KEY][1]
        provider = self.service.provider
        # The 401 of `_as_user`, before any cached credit could answer.
        if provider.id_token_required and user_id_token(request, provider.agent_id_token) is None:
            raise IdTokenRequired(MISSING)
        # A hit calls no provider, so only a load needs the ID token made current.
        body = self.service.cached_reply(identity)
        if body is None:
            with self._as_user(request):
                body = await self.service.credit_reply(identity)
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
        if key is not None and not IDEMPOTENCY_KEY.matches(key):
            raise http_error(400, BAD_IDEMPOTENCY_KEY)
        with self._as_user(request):
            reply = await service.initiate_purchase(request[VERIFIED_KEY][1], body.return_url, key, body.pack)
        return json_reply(reply)

    async def purchase_status(self, request: web.Request) -> web.Response:
        service = self._selling()
        payment_id = request.match_info["payment_id"]
        if not PAYMENT_ID.matches(payment_id):
            raise PaymentNotFound
        with self._as_user(request):
            return json_reply(await service.purchase_status(request[VERIFIED_KEY][1], payment_id))

    async def transactions(self, request: web.Request) -> web.Response:
        limit, offset = LIMIT.read(request), OFFSET.read(request)
        with self._as_user(request):
            return json_reply(await self.service.transactions(request[VERIFIED_KEY][1], limit, offset))

    async def verify_google_play(self, request: web.Request) -> web.Response:
        purchase = await self._read(request, GooglePlayPurchase)
        if not self.service.provider.google_play_enabled:
            return _store_off()
        return await self._verify(request, lambda who: self.service.verify_google_play(who, purchase))

    async def verify_app_store(self, request: web.Request) -> web.Response:
        purchase = await self._read(request, AppStorePurchase)
        if not self.service.provider.apple_storekit_enabled:
            return _store_off()
        return await self._verify(request, lambda who: self.service.verify_app_store(who, purchase))

    async def _read(self, request: web.Request, model: type[M]) -> M:
        config = self.service.config
        return await read_model(request, model, config.max_body_bytes, time_limit=config.body_timeout_seconds)

    async def _verify(
        self, request: web.Request, verify: Callable[[Identity], Awaitable[StoreVerification]]
    ) -> web.Response:
        with self._as_user(request):
            return json_reply(await verify(request[VERIFIED_KEY][1]))

    def _as_user(self, request: web.Request) -> AbstractContextManager[IdToken | None]:
        """The request's ID token made current for the provider (see `id_token`); a 401 first if the
        provider needs one and neither the request nor the agent has one, before any cached credit
        could answer."""
        provider = self.service.provider
        if provider.id_token_required:
            token = user_id_token(request, provider.agent_id_token)
            if token is None:
                raise IdTokenRequired(MISSING)
            return id_token_as(token)
        return id_token_scope(request)

    async def expect_authenticated(self, request: web.Request) -> None:
        """`Expect:` is answered before middlewares run: check the token before inviting an upload."""
        identity_of_request(request, self.service.verifier)  # a 401 here is sent instead of 100
        await expect_continue(request)

    def answer_unmatched(
        self, router: web.UrlDispatcher, prefix: str, guard: Callable[[Handler], Handler]
    ) -> None:
        """Route the prefix itself and every path below it that no billing route serves to
        `unmatched`. aiohttp tries the most specific path first, so the billing routes still win."""
        for path in (prefix, f"{prefix}/{{tail:.*}}"):
            resource = router.add_route(
                "*", path, guard(self.unmatched), expect_handler=self.expect_authenticated
            ).resource
            assert resource is not None
            CATCH_ALLS.add(resource)

    async def unmatched(self, request: web.Request) -> web.Response:
        """The JSON 404 or 405 for a path or method no billing route serves. Answered by a route
        rather than left to aiohttp, whose own 404/405 get its default `Expect:` handling (a
        `100 Continue` before the token check, a plain-text 417)."""
        return await unmatched_reply(request)

    def _selling(self) -> BillingService:
        """The service, if its provider sells credits; checked before the body or id is even read."""
        if not self.service.provider.purchases_enabled:
            raise BillingDisabled
        return self.service


#: A provider route's path below the prefix: a first segment of its own, then anything a route may be.
PROVIDER_PATH: Final = re.compile(r"/[a-z0-9][a-z0-9_\-]{0,63}/[A-Za-z0-9_\-./{}]{1,200}")
#: First path segments the package's own routes use: no provider route may take one.
RESERVED_SEGMENTS: Final = frozenset(
    op.path.split("/")[1] for op in (*BILLING_OPERATIONS, *CREDIT_OPERATIONS)
) | {"tools"}


def provider_routes(provider: CreditProvider) -> tuple[ProviderRoute, ...]:
    """The provider's own routes (`CreditProvider.routes`), checked at startup: each a `ProviderRoute`
    whose path is under a first segment of its own that no billing route uses, no two the same."""
    declared = tuple(provider.routes())
    seen: set[tuple[str, str]] = set()
    for route in declared:
        if not isinstance(route, ProviderRoute):
            raise ConfigError(f"Credit provider {provider.name!r}: routes() must give ProviderRoute items")
        op = route.operation
        if not PROVIDER_PATH.fullmatch(op.path) or op.path.split("/")[1] in RESERVED_SEGMENTS:
            raise ConfigError(
                f"Credit provider {provider.name!r}: route path {op.path!r} must be /SEGMENT/..., under a "
                f"first segment of its own (not one of {', '.join(sorted(RESERVED_SEGMENTS))})"
            )
        if (op.method, op.path) in seen:
            raise ConfigError(f"Credit provider {provider.name!r}: route {op.method} {op.path} twice")
        seen.add((op.method, op.path))
    return declared


def add_routes(
    router: web.UrlDispatcher,
    service: BillingService,
    prefix: str = "",
    *,
    public: set[Handler],
    api: set[web.AbstractResource],
    describe: Handler,
    own_router: bool = False,
    guards: RouteGuards | None = None,
    extra: tuple[ProviderRoute, ...] = (),
) -> web.AbstractResource:
    """Add the billing routes to `router`, each path under `prefix` (empty inside the sub-app), and
    `describe` (the API description) at `OPENAPI`'s path. The handlers of routes that need no token
    are added to `public`, which the token check skips, and the resources of the JSON API to `api`
    (what `cors_origins` opens to other origins; the UI kit's files are readable from any origin).

    Every route checks `Expect:` (the token first, where one is needed) before granting
    `100-continue`. With `own_router` (a router that serves nothing else under the prefix: the
    billing sub-app's, or the app's with `setup_billing(claim_prefixes=True)`) every other path and
    method is answered too, with the same `Expect:` handling and a JSON 404/405.

    With `guards`, each handler is bound to the error middleware itself (`errors.RouteGuards`),
    for an application that has none installed.

    The provider's own routes (`extra`, from `provider_routes`) are added under `prefix` too: each
    needs the token unless its operation says `bearer=False` (it is then added to `public`).

    Returns the `/credits` resource: mounting the application prefixes it like every other one,
    which is how `setup_billing` learns where the routes ended up.
    """
    routes = BillingRoutes(service)
    expect = routes.expect_authenticated
    guard = unguarded if guards is None else guards.protected
    if guards is None:
        credits_route = router.add_get(prefix + CREDITS.path, routes.get_credits, expect_handler=expect)
    else:
        # GET on a route of its own, whose answers the fast handler counts; HEAD (which `add_get`
        # adds with the same handler) keeps the guarded one.
        cached = CachedCredits(service, guard(routes.get_credits))
        credits_route = router.add_get(
            prefix + CREDITS.path, cached.answer, expect_handler=expect, allow_head=False
        )
        cached.count_as(credits_route)
        router.add_route("HEAD", prefix + CREDITS.path, guard(routes.get_credits), expect_handler=expect)
    added = [
        credits_route,
        router.add_get(prefix + CAPABILITIES.path, guard(routes.capabilities), expect_handler=expect),
        router.add_post(prefix + INITIATE.path, guard(routes.initiate_purchase), expect_handler=expect),
        router.add_get(prefix + STATUS.path, guard(routes.purchase_status), expect_handler=expect),
        router.add_get(prefix + TRANSACTIONS.path, guard(routes.transactions), expect_handler=expect),
        router.add_post(prefix + GOOGLE_PLAY.path, guard(routes.verify_google_play), expect_handler=expect),
        router.add_post(prefix + APP_STORE.path, guard(routes.verify_app_store), expect_handler=expect),
        router.add_get(
            prefix + OPENAPI.path,
            describe if guards is None else guards.public(describe),
            expect_handler=expect_continue,
        ),
    ]
    added += add_credit_routes(router, service, prefix, expect, guard)
    for route in extra:
        op = route.operation
        handler = route.handler
        if guards is not None:
            handler = (guards.protected if op.bearer else guards.public)(handler)
        router.add_route(
            op.method,
            prefix + op.path,
            handler,
            expect_handler=expect if op.bearer else expect_continue,
        )
        if not op.bearer:
            public.add(handler)
    public.add(describe)
    api.update(route.resource for route in added if route.resource is not None)
    credits = added[0].resource
    if service.config.serve_ui:
        # Every path below /ui/ goes to the files' handler, so an unknown one is a 404 without a token.
        ui = UIFiles().serve
        router.add_get(
            prefix + UI_FILE.path.replace("{name}", "{name:.*}"),
            ui if guards is None else guards.public(ui),
            expect_handler=expect_continue,
        )
        public.add(ui)
    if own_router:
        routes.answer_unmatched(router, prefix, guard)
    assert credits is not None  # a route added by path always has its resource
    return credits
