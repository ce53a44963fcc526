"""The credit gate for the host's own handlers: one use per successful interaction.

    @credit_gate
    async def interact(request: web.Request) -> web.Response: ...

    @credit_gate(product="web_search")
    async def search(request: web.Request) -> web.Response: ...

The use is taken atomically *before* the handler runs, under a key unique to this request, so
concurrent calls can never overspend; it is given back when the handler raises or answers with an
error status (4xx or 5xx), so a user never pays for an interaction that did not happen. A client
that goes away while the handler still reads its body gets the package's usual "client gone"
handling (one DEBUG line, a 400 nobody reads), with or without `error_middleware()` on the host.
The gate uses the same identity and the same credit cache as `GET /credits`, so the UI shows
exactly what the gate spends.

A provider that declares `gate_charges` false (the `ciris` provider in `id_token` mode, whose
backend takes charges only with an API key) is "informational": the gate checks that the user has
credit and runs the handler without taking a use; something else (CIRIS's LLM proxy) charges.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import overload

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import identity_of_request
from .errors import (
    BillingError,
    IdTokenRequired,
    InsufficientCredit,
    client_gone,
    client_left,
    http_error,
    to_http,
)
from .id_token import MISSING, IdToken, id_token_as, id_token_of, user_id_token
from .identity import Identity
from .keys import SPEND_KEY, SPENT_STATUS_KEY, billing_service
from .products import TOOL_NAME, valid_tool_name
from .service import BillingService

logger = logging.getLogger("ciris_billing_proxy")


@overload
def credit_gate(handler: Handler, /) -> Handler: ...


@overload
def credit_gate(*, product: str | None = None) -> Callable[[Handler], Handler]: ...


def credit_gate(
    handler: Handler | None = None, /, *, product: str | None = None
) -> Handler | Callable[[Handler], Handler]:
    """`@credit_gate` (one interaction use per successful call) or `@credit_gate(product="web_search")`
    (one use of that product: see `docs/tool-credits.md`). Options are keywords, so more can come."""
    if product is not None and not valid_tool_name(product):
        raise ValueError(f"credit_gate(product=...) must match {TOOL_NAME.pattern!r}")
    if handler is None:
        return functools.partial(_gate, product=product)
    return _gate(handler, product=product)


def _gate(handler: Handler, *, product: str | None) -> Handler:
    return _interaction_gate(handler) if product is None else _product_gate(handler, product)


def _interaction_gate(handler: Handler) -> Handler:
    """Decorate an aiohttp handler so each successful call costs the caller one use.

    The caller's token is checked as `get_identity` does. Without credit the handler does not run
    and the client gets 402 (`insufficient_credit`), or 503 when the provider cannot answer. The use
    is taken before the handler runs and given back when it raises or answers with a 4xx/5xx. Roles
    in `gate_bypass_roles` pass free.
    The key spent under is `request[SPEND_KEY]` (`ciris_billing_proxy.keys`), and the credit left
    right after the spend `request[SPENT_STATUS_KEY]` when the provider tells it. Needs
    `setup_billing()` on the handler's application or one it is mounted in (`RuntimeError`
    otherwise).
    """

    @functools.wraps(handler)
    async def gated(request: web.Request) -> web.StreamResponse:
        service = billing_service(request)
        identity = identity_of_request(request, service.verifier)
        if identity.role in service.config.gate_bypass_roles:
            return await handler(request)
        if service.provider.id_token_required:
            token = user_id_token(request, service.provider.agent_id_token)
            if token is None:
                raise to_http(IdTokenRequired(MISSING), gate=True)
        else:
            token = id_token_of(request)
        if not service.provider.gate_charges:
            await _check_credit(service, token, identity)
            return await handler(request)
        # Server-made, never client-supplied: a reusable client key would let a user replay it for
        # free interactions.
        key = os.urandom(16).hex()
        try:
            with id_token_as(token):
                status = await service.spend(identity, key)
        except BillingError as exc:
            raise to_http(exc, gate=True) from None
        request[SPEND_KEY] = key
        if status is not None:
            request[SPENT_STATUS_KEY] = status
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                await _give_back(service, identity, key, f"the interaction failed (HTTP {exc.status})")
            raise
        except BaseException as exc:
            gone = client_left(request, exc)
            why = "the client left" if gone else f"the interaction failed ({type(exc).__name__})"
            await _give_back(service, identity, key, why)
            if gone:
                raise client_gone(request) from None
            raise
        if response.status >= 400:
            await _give_back(service, identity, key, f"the interaction failed (HTTP {response.status})")
        return response

    @functools.wraps(handler)
    async def counted(request: web.Request) -> web.StreamResponse:
        # For the metrics, by route and status: one dict entry bumped.
        try:
            response = await gated(request)
        except web.HTTPException as exc:
            billing_service(request).counts.request(request.match_info.route, exc.status)
            raise
        billing_service(request).counts.request(request.match_info.route, response.status)
        return response

    return counted


def _product_gate(handler: Handler, product: str) -> Handler:
    """As the interaction gate, but each successful call costs one use of `product` (a product the
    provider declares; another is a 404 `Tool not found`)."""

    @functools.wraps(handler)
    async def gated(request: web.Request) -> web.StreamResponse:
        service = billing_service(request)
        identity = identity_of_request(request, service.verifier)
        if identity.role in service.config.gate_bypass_roles:
            return await handler(request)
        provider = service.provider
        if product not in provider.products:
            raise http_error(404, f"Tool not found: {product}")
        token = user_id_token(request, provider.agent_id_token)
        if provider.id_token_required and token is None:
            raise to_http(IdTokenRequired(MISSING), gate=True)
        try:
            with id_token_as(token):
                if not provider.gate_charges:
                    check = await service.product_check(identity, product)
                    if not check.has_credit:
                        raise InsufficientCredit(f"No {product} uses remaining")
                    return await handler(request)
                key = os.urandom(16).hex()
                await service.spend_product(identity, product, key)
        except BillingError as exc:
            raise to_http(exc, gate=True) from None
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
                raise client_gone(request) from None
            raise
        if response.status >= 400:
            await service.give_back_product(identity, product, key)
        return response

    return gated


async def _check_credit(service: BillingService, token: IdToken | None, identity: Identity) -> None:
    """The informational gate: a 402 without credit, nothing taken with it."""
    try:
        with id_token_as(token):
            status = await service.credit_status(identity)
        if not status.has_credit:
            raise InsufficientCredit(status.reason or "No free uses or credits remaining")
    except BillingError as exc:
        raise to_http(exc, gate=True) from None


async def _give_back(service: BillingService, identity: Identity, key: str, why: str) -> None:
    try:
        await service.give_back(identity, key, why)
    except BillingError:
        # The interaction already failed; a failed refund must not replace that error. The log line
        # names the request key, so an operator can reconcile it.
        logger.warning("Could not give back the use spent under request key %s", key)
