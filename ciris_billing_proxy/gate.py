"""The credit gate for the host's own handlers: one use (or a cost) per successful interaction.

    @credit_gate
    async def interact(request: web.Request) -> web.Response: ...

    @credit_gate(cost=3)                    # or cost=lambda request: ..., sync or async
    async def summarise(request: web.Request) -> web.Response: ...

    @credit_gate(reserve=20)                # the cost is known afterwards: settle it
    async def chat(request: web.Request) -> web.Response:
        ...
        await billing_spend(request).settle(tokens_used // 1000 + 1, model="m", input_tokens=...)

    @credit_gate(product="web_search")
    async def search(request: web.Request) -> web.Response: ...

The credit is taken atomically *before* the handler runs, under a key unique to this request, so
concurrent calls can never overspend; it is given back when the handler raises or answers with an
error status (4xx or 5xx), so a user never pays for an interaction that did not happen. A client
that goes away while the handler still reads its body gets the package's usual "client gone"
handling (one DEBUG line, a 400 nobody reads), with or without `error_middleware()` on the host.
The gate uses the same identity and the same credit cache as `GET /credits`, so the UI shows
exactly what the gate spends.
Its own refusals (401, 402, 503) are returned as JSON responses, never raised, so a host middleware
that formats `HTTPException`s passes them on unchanged (docs/operations.md).

Weighted spends (docs/credits.md) need a provider that declares `weighted_spends`; an app with a
gate of another cost than 1, or a reservation, on a provider without them refuses to start.

* `cost`: a whole number (1 or more), or a callable of the request returning one (it may be async;
  it runs before anything is taken, so it may read the body, and what it raises passes on as the
  handler's would; 0 lets the request through free). Taken whole, or the request is refused 402.
* `reserve`: the most the request may cost (a number or such a callable). It is taken before the
  handler; the handler settles what it really cost (`billing_spend(request).settle(n, ...)`, at
  most the reservation) and the rest goes back. A handler that succeeds without settling is charged
  the whole reservation; one that fails gets everything back, settled or not.
* `billing_spend(request).usage(model=..., input_tokens=..., output_tokens=..., tool=...,
  metadata={...})` says what the spend was for; it is recorded once the handler succeeded.

A provider that declares `gate_charges` false (the `ciris` provider in `id_token` mode, whose
backend takes charges only with an API key) is "informational": the gate checks that the user has
credit and runs the handler without taking a use; something else (CIRIS's LLM proxy) charges.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, overload

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import identity_of_request
from .config import ConfigError
from .errors import (
    BillingError,
    HTTPJSONError,
    IdTokenRequired,
    InsufficientCredit,
    client_gone,
    client_left,
    http_error,
    to_http,
)
from .id_token import MISSING, IdToken, id_token_as, id_token_of, user_id_token
from .identity import Identity
from .keys import GATED_SPEND_KEY, SPEND_KEY, SPENT_STATUS_KEY, billing_service
from .ledger import Usage
from .ledger.model import MAX_AMOUNT
from .ops.request_id import HEADER as REQUEST_ID_HEADER
from .ops.request_id import assign_request_id, current_request_id
from .products import TOOL_NAME, valid_tool_name
from .providers.base import CreditProvider
from .service import BillingService

logger = logging.getLogger("ciris_billing_proxy")


#: What a cost or reservation is: a number, or a callable of the request giving one.
Cost = int | Callable[[web.Request], int | Awaitable[int]]
#: The attribute a gated handler carries: what the gate needs of the provider (`check_gates`).
NEEDS: Final = "__credit_gate__"


@dataclass(frozen=True, slots=True)
class GateNeeds:
    weighted: bool


@overload
def credit_gate(handler: Handler, /) -> Handler: ...


@overload
def credit_gate(
    *, product: str | None = None, cost: Cost = 1, reserve: Cost | None = None
) -> Callable[[Handler], Handler]: ...


def credit_gate(
    handler: Handler | None = None,
    /,
    *,
    product: str | None = None,
    cost: Cost = 1,
    reserve: Cost | None = None,
) -> Handler | Callable[[Handler], Handler]:
    """`@credit_gate` (one interaction use per successful call), `@credit_gate(cost=...)`,
    `@credit_gate(reserve=...)` (see the module docstring) or `@credit_gate(product="web_search")`
    (one use of that product: see `docs/tool-credits.md`). Options are keywords, so more can come."""
    if product is not None and not valid_tool_name(product):
        raise ValueError(f"credit_gate(product=...) must match {TOOL_NAME.pattern!r}")
    for name, value in (("cost", cost), ("reserve", reserve)):
        if isinstance(value, bool) or not (callable(value) or value is None or isinstance(value, int)):
            raise TypeError(f"credit_gate({name}=...) takes a whole number or a callable of the request")
        if isinstance(value, int) and not 1 <= value <= MAX_AMOUNT:
            raise ValueError(f"credit_gate({name}=...) must be from 1 to {MAX_AMOUNT}")
    if reserve is not None and cost != 1:
        raise ValueError("credit_gate takes a cost or a reservation, not both")
    if product is not None and (cost != 1 or reserve is not None):
        raise ValueError("a product's gate takes one use of it: no cost or reservation")
    if handler is None:
        return functools.partial(_gate, product=product, cost=cost, reserve=reserve)
    return _gate(handler, product=product, cost=cost, reserve=reserve)


def _gate(handler: Handler, *, product: str | None, cost: Cost, reserve: Cost | None) -> Handler:
    if product is not None:
        return _product_gate(handler, product)
    gated = _interaction_gate(handler, cost if reserve is None else reserve, reserve is not None)
    setattr(gated, NEEDS, GateNeeds(weighted=cost != 1 or reserve is not None))
    return gated


def check_gates(app: web.Application, provider: CreditProvider) -> None:
    """At startup: every `@credit_gate` on `app` and the applications mounted in it can be served
    by `provider`; a `ConfigError` naming the route otherwise."""
    if provider.weighted_spends:
        return
    for route in app.router.routes():
        needs = getattr(route.handler, NEEDS, None)
        if isinstance(needs, GateNeeds) and needs.weighted:
            raise ConfigError(
                f"{route.method} {route.resource.canonical if route.resource else '?'}: a @credit_gate with "
                f"a cost or a reservation needs a provider with weighted spends; {provider.name!r} takes "
                "one use per interaction"
            )
    for resource in app.router.resources():
        mounted = getattr(resource, "_app", None)  # a sub-application's resource
        if isinstance(mounted, web.Application):
            check_gates(mounted, provider)


class GatedSpend:
    """What the gate took for this request (`billing_spend(request)`): its key, the cost or
    reservation, and the handler's word on usage and (for a reservation) the real cost."""

    __slots__ = ("_identity", "_service", "_usage", "amount", "key", "reserved", "settled")

    def __init__(
        self, service: BillingService, identity: Identity, key: str, amount: int, reserved: bool
    ) -> None:
        self._service = service
        self._identity = identity
        self.key = key
        #: What was taken: the cost, or the reservation.
        self.amount = amount
        self.reserved = reserved
        self.settled = False
        self._usage: Usage | None = None

    def usage(self, usage: Usage | None = None, **fields: Any) -> None:
        """Say what the spend was for (`Usage` fields: model, input_tokens, output_tokens, tool,
        metadata); recorded once the handler succeeded. A `ValueError` for invalid fields."""
        self._usage = usage if usage is not None else Usage.model_validate(fields)

    async def settle(self, cost: int, usage: Usage | None = None, **fields: Any) -> None:
        """Keep `cost` of the reservation (at most what it reserved; 0 keeps nothing) and give the
        rest back now; with the usage, if given. Once: a second call changes nothing."""
        if not self.reserved:
            raise RuntimeError("settle() is for a @credit_gate(reserve=...) handler")
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError("settle() takes a whole number of 0 or more")
        if usage is not None or fields:
            self.usage(usage, **fields)
        if self.settled:
            return
        self.settled = True
        await self._service.settle(self._identity, self.key, cost, self._usage)

    async def _finish(self) -> None:
        """After a successful handler: an unsettled reservation is kept whole; usage recorded."""
        if self.reserved and not self.settled:
            self.settled = True
            await self._service.settle(self._identity, self.key, self.amount, self._usage)
        elif self._usage is not None and not self.reserved:
            await self._service.record_usage(self._identity, self.key, self._usage)


def billing_spend(request: web.Request) -> GatedSpend:
    """What the `@credit_gate` of this handler took (`RuntimeError` in a handler it took nothing
    for: not gated, a product gate, a bypass role, or a provider that does not charge)."""
    if GATED_SPEND_KEY not in request:
        raise RuntimeError("billing_spend() is for handlers under @credit_gate that took credit")
    return request[GATED_SPEND_KEY]


async def _amount(cost: Cost, request: web.Request) -> int:
    if isinstance(cost, int):
        return cost
    value = cost(request)
    if inspect.isawaitable(value):
        value = await value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise ValueError(f"a credit_gate cost callable must return a whole number from 0 to {MAX_AMOUNT}")
    return value


def _interaction_gate(handler: Handler, cost: Cost, reserve: bool) -> Handler:
    """Decorate an aiohttp handler so each successful call costs the caller `cost` (a reservation
    settled by the handler when `reserve`).

    The caller's token is checked as `get_identity` does. Without credit the handler does not run
    and the client gets 402 (`insufficient_credit`), or 503 when the provider cannot answer. The
    credit is taken before the handler runs and given back when it raises or answers with a 4xx/5xx.
    Roles in `gate_bypass_roles` pass free.
    The key spent under is `request[SPEND_KEY]` (`ciris_billing_proxy.keys`), the credit left
    right after the spend `request[SPENT_STATUS_KEY]` when the provider tells it, and what was taken
    `billing_spend(request)`. Needs `setup_billing()` on the handler's application or one it is
    mounted in (`RuntimeError` otherwise).
    """

    @functools.wraps(handler)
    async def gated(request: web.Request) -> web.StreamResponse:
        service = billing_service(request)
        rid = current_request_id.get() or assign_request_id(request)
        # Counted for the metrics by route and status (one dict entry bumped), also what the host's
        # handler raises.
        try:
            response = await _interaction(handler, request, service, cost, reserve)
        except web.HTTPException as exc:
            service.counts.request(request.match_info.route, exc.status)
            raise
        service.counts.request(request.match_info.route, response.status)
        response.headers[REQUEST_ID_HEADER] = rid  # no effect on a response already sent
        return response

    return gated


async def _interaction(
    handler: Handler, request: web.Request, service: BillingService, cost: Cost, reserve: bool
) -> web.StreamResponse:
    """The gate's own refusals (401, 402, 503) are returned, never raised: the gate runs inside the
    host's middlewares, and one that rewrites every `HTTPException` would drop their bodies and
    `WWW-Authenticate`. What the host's handler raises is the host's, and passes on as it is."""
    try:
        identity = identity_of_request(request, service.verifier)
    except HTTPJSONError as exc:
        return exc.reply()
    if identity.role in service.config.gate_bypass_roles:
        return await handler(request)
    if service.provider.id_token_required:
        token = user_id_token(request, service.provider.agent_id_token)
        if token is None:
            return to_http(IdTokenRequired(MISSING), gate=True).reply()
    else:
        token = id_token_of(request)
    if not service.provider.gate_charges:
        refused = await _check_credit(service, token, identity)
        return refused if refused is not None else await handler(request)
    amount = await _amount(cost, request)
    if amount == 0:
        return await handler(request)
    # Server-made, never client-supplied: a reusable client key would let a user replay it for
    # free interactions.
    key = os.urandom(16).hex()
    try:
        with id_token_as(token):
            if reserve:
                status = await service.reserve(identity, key, amount)
            else:
                status = await service.spend(identity, key, amount)
    except BillingError as exc:
        return to_http(exc, gate=True).reply()
    request[SPEND_KEY] = key
    if status is not None:
        request[SPENT_STATUS_KEY] = status
    spend = request[GATED_SPEND_KEY] = GatedSpend(service, identity, key, amount, reserve)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            await _give_back(service, identity, key, f"the interaction failed (HTTP {exc.status})", amount)
        raise
    except BaseException as exc:
        gone = client_left(request, exc)
        why = "the client left" if gone else f"the interaction failed ({type(exc).__name__})"
        await _give_back(service, identity, key, why, amount)
        if gone:
            return client_gone(request).reply()
        raise
    if response.status >= 400:
        await _give_back(service, identity, key, f"the interaction failed (HTTP {response.status})", amount)
        return response
    if not spend.reserved and spend._usage is None:
        return response
    try:
        await spend._finish()
    except BillingError:
        # The interaction happened; an unsettled reservation stays taken whole (logged).
        logger.warning("Could not settle the reservation of request key %s", key)
    return response


def _product_gate(handler: Handler, product: str) -> Handler:
    """As the interaction gate, but each successful call costs one use of `product` (a product the
    provider declares; another is a 404 `Tool not found`, returned like the gate's other refusals)."""

    @functools.wraps(handler)
    async def gated(request: web.Request) -> web.StreamResponse:
        service = billing_service(request)
        rid = current_request_id.get() or assign_request_id(request)
        response = await _product_use(handler, request, service, product)
        response.headers[REQUEST_ID_HEADER] = rid  # no effect on a response already sent
        return response

    return gated


async def _product_use(
    handler: Handler, request: web.Request, service: BillingService, product: str
) -> web.StreamResponse:
    try:
        identity = identity_of_request(request, service.verifier)
    except HTTPJSONError as exc:
        return exc.reply()
    if identity.role in service.config.gate_bypass_roles:
        return await handler(request)
    provider = service.provider
    if product not in provider.products:
        return http_error(404, f"Tool not found: {product}").reply()
    token = user_id_token(request, provider.agent_id_token)
    if provider.id_token_required and token is None:
        return to_http(IdTokenRequired(MISSING), gate=True).reply()
    if not provider.gate_charges:
        try:
            with id_token_as(token):
                check = await service.product_check(identity, product)
                if not check.has_credit:
                    raise InsufficientCredit(f"No {product} uses remaining")
                return await handler(request)
        except BillingError as exc:
            return to_http(exc, gate=True).reply()
    key = os.urandom(16).hex()
    try:
        with id_token_as(token):
            await service.spend_product(identity, product, key)
    except BillingError as exc:
        return to_http(exc, gate=True).reply()
    request[SPEND_KEY] = key
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            await service.give_back_product(identity, product, key)
        raise
    except BaseException as exc:
        await service.give_back_product(identity, product, key)
        if client_left(request, exc):
            return client_gone(request).reply()
        raise
    if response.status >= 400:
        await service.give_back_product(identity, product, key)
    return response


async def _check_credit(
    service: BillingService, token: IdToken | None, identity: Identity
) -> web.Response | None:
    """The informational gate: a 402 without credit (returned), nothing taken with it."""
    try:
        with id_token_as(token):
            status = await service.credit_status(identity)
        if not status.has_credit:
            raise InsufficientCredit(status.reason or "No free uses or credits remaining")
    except BillingError as exc:
        return to_http(exc, gate=True).reply()
    return None


async def _give_back(service: BillingService, identity: Identity, key: str, why: str, amount: int) -> None:
    try:
        await service.give_back(identity, key, why, amount=amount)
    except BillingError:
        # The interaction already failed; a failed refund must not replace that error. The log line
        # names the request key, so an operator can reconcile it.
        logger.warning("Could not give back the use spent under request key %s", key)
