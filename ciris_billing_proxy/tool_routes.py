"""The tool routes (per-product credits) under the tools prefix (`/v1/api/tools` by default), with
the CIRIS agent's shapes, status codes and tool-name rule (`routes/tools.py`), so the CIRIS apps read
them unchanged:

  GET  balance/{tool}   one product's balance          GET  balance    every product's
  GET  check/{tool}     whether a gated call would pass GET  available  the tools and their cost
  POST purchase         redeem a store purchase of a product's pack

Thin like `routes.py`: the same token check and JSON errors (a sub-app of its own, or the host's
router scoped by path), the same ID-token handling, and every call through the service.
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from .bodies import read_model
from .errors import BILLING_DISABLED, RouteGuards, http_error, unguarded
from .keys import VERIFIED_KEY
from .operations import BEARER_ERRORS, BODY_ERRORS, PROVIDER_FAILED, Operation, TextParam
from .products import (
    TOOL_NAME,
    AvailableTools,
    ToolBalance,
    ToolBalances,
    ToolCheck,
    ToolInfo,
    ToolPurchase,
    ToolPurchaseRequest,
    valid_tool_name,
)
from .routes import AS_USER_ERRORS, BillingRoutes, json_reply
from .service import BillingService

INVALID_NAME: Final = (
    "Invalid tool name: it must start with a letter and have only letters, digits and underscores "
    "(at most 64)"
)
#: Any other name the route is asked about: the product is not sold here.
NOT_FOUND: Final = "Tool not found: {name}"
TOOL: Final = TextParam(
    "tool",
    re.compile(TOOL_NAME.pattern),
    "A product the provider sells per use (e.g. `web_search`); another name that fits the rule is a 404.",
)
BAD_NAME: Final = "the tool name breaks the rule `^[a-zA-Z]\\w{0,63}$`"
UNKNOWN: Final = "the provider sells no such product"

TOOL_BALANCE: Final = Operation(
    "getToolBalance",
    "GET",
    "/balance/{tool}",
    "The caller's balance of one product: free and paid uses left, the price of a use, uses so far.",
    ToolBalance,
    {**AS_USER_ERRORS, 400: BAD_NAME, 404: UNKNOWN, 503: PROVIDER_FAILED},
    "tools",
    path_params=(TOOL,),
)
TOOL_BALANCES: Final = Operation(
    "getToolBalances",
    "GET",
    "/balance",
    "The caller's balance of every product the provider sells per use.",
    ToolBalances,
    {**AS_USER_ERRORS, 503: PROVIDER_FAILED},
    "tools",
)
TOOL_CHECK: Final = Operation(
    "checkTool",
    "GET",
    "/check/{tool}",
    "Whether the caller has a use of the product left (a gated call would pass now).",
    ToolCheck,
    {**AS_USER_ERRORS, 400: BAD_NAME, 404: UNKNOWN, 503: PROVIDER_FAILED},
    "tools",
    path_params=(TOOL,),
)
TOOLS_AVAILABLE: Final = Operation(
    "getAvailableTools",
    "GET",
    "/available",
    "The products sold per use, with their description and cost in credits per use.",
    AvailableTools,
    dict(BEARER_ERRORS),
    "tools",
)
TOOL_PURCHASE: Final = Operation(
    "purchaseTool",
    "POST",
    "/purchase",
    "Redeem a store purchase of a product's pack: its uses are added to the caller's balance of that "
    "product, once. A provider that redeems none answers 200 with `success: false`.",
    ToolPurchase,
    {
        **AS_USER_ERRORS,
        **BODY_ERRORS,
        400: "the body is not JSON, the tool name breaks the rule, or the store refused the purchase",
        404: UNKNOWN,
        409: "the purchase was redeemed before (`Purchase already processed`): nothing added",
        503: PROVIDER_FAILED,
    },
    "tools",
    body=ToolPurchaseRequest,
    body_required=True,
)
TOOL_OPERATIONS: Final = (TOOL_BALANCE, TOOL_BALANCES, TOOL_CHECK, TOOLS_AVAILABLE, TOOL_PURCHASE)


class ToolRoutes(BillingRoutes):
    """The tool handlers, with the billing routes' token, ID-token and unmatched-path handling."""

    def _product(self, name: str) -> str:
        if not valid_tool_name(name):
            raise http_error(400, INVALID_NAME)
        if name not in self.service.provider.products:
            raise http_error(404, NOT_FOUND.format(name=name))
        return name

    async def balance(self, request: web.Request) -> web.Response:
        product = self._product(request.match_info["tool"])
        with self._as_user(request):
            return json_reply(await self.service.product_balance(request[VERIFIED_KEY][1], product))

    async def balances(self, request: web.Request) -> web.Response:
        with self._as_user(request):
            balances = await self.service.product_balances(request[VERIFIED_KEY][1])
        return json_reply(ToolBalances(balances=balances))

    async def check(self, request: web.Request) -> web.Response:
        product = self._product(request.match_info["tool"])
        with self._as_user(request):
            return json_reply(await self.service.product_check(request[VERIFIED_KEY][1], product))

    async def available(self, request: web.Request) -> web.Response:
        provider = self.service.provider
        tools = [
            ToolInfo(name=name, description=product.description, cost=1.0, available=True)
            for name, product in provider.products.items()
        ]
        return json_reply(
            AvailableTools(tools=tools, platform="server", has_google_auth=provider.id_token_required)
        )

    async def purchase(self, request: web.Request) -> web.Response:
        provider = self.service.provider
        config = self.service.config
        body = await read_model(
            request, ToolPurchaseRequest, config.max_body_bytes, time_limit=config.body_timeout_seconds
        )
        if not valid_tool_name(body.tool_name):
            raise http_error(400, INVALID_NAME)
        if body.tool_name not in provider.products:
            raise http_error(404, NOT_FOUND.format(name=body.tool_name))
        if not provider.product_purchases_enabled:
            return json_reply(
                ToolPurchase(
                    success=False,
                    product_type=body.tool_name,
                    credits_added=0,
                    new_balance=0,
                    message=BILLING_DISABLED,
                )
            )
        with self._as_user(request):
            return json_reply(await self.service.verify_product_purchase(request[VERIFIED_KEY][1], body))


def add_tool_routes(
    router: web.UrlDispatcher,
    service: BillingService,
    prefix: str = "",
    *,
    own_router: bool = False,
    guards: RouteGuards | None = None,
) -> list[Handler]:
    """Add the tool routes to `router` under `prefix` (empty inside their sub-app); with
    `own_router`, every other path and method below it is a JSON 404/405; with `guards`, each
    handler bound to the error middleware (as `routes.add_routes`). Returns the handlers."""
    routes = ToolRoutes(service)
    expect = routes.expect_authenticated
    guard = unguarded if guards is None else guards.protected
    handlers: dict[Operation, Handler] = {
        TOOL_BALANCE: routes.balance,
        TOOL_BALANCES: routes.balances,
        TOOL_CHECK: routes.check,
        TOOLS_AVAILABLE: routes.available,
        TOOL_PURCHASE: routes.purchase,
    }
    for op, handler in handlers.items():
        router.add_route(op.method, prefix + op.path, guard(handler), expect_handler=expect)
    if own_router:
        routes.answer_unmatched(router, prefix, guard)
    return list(handlers.values())
