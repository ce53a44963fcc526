"""The credit gate for the host's own handlers: one use per successful interaction.

    @credit_gate
    async def interact(request: web.Request) -> web.Response: ...

The use is taken atomically *before* the handler runs, under a key unique to this request, so
concurrent calls can never overspend; it is given back when the handler raises or answers with an
error status (4xx or 5xx), so a user never pays for an interaction that did not happen. A client
that goes away while the handler still reads its body gets the package's usual "client gone"
handling (one DEBUG line, a 400 nobody reads), with or without `error_middleware()` on the host.
The gate uses the same identity and the same credit cache as `GET /credits`, so the UI shows
exactly what the gate spends.
Its own refusals (401, 402, 503) are returned as JSON responses, never raised, so a host middleware
that formats `HTTPException`s passes them on unchanged (docs/operations.md).

A provider that declares `gate_charges` false (the `ciris` provider in `id_token` mode, whose
backend takes charges only with an API key) is "informational": the gate checks that the user has
credit and runs the handler without taking a use; something else (CIRIS's LLM proxy) charges.
"""

from __future__ import annotations

import functools
import logging
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import identity_of_request
from .errors import (
    BillingError,
    HTTPJSONError,
    IdTokenRequired,
    InsufficientCredit,
    client_gone,
    client_left,
    to_http,
)
from .id_token import MISSING, id_token_of, id_token_scope
from .identity import Identity
from .keys import SPEND_KEY, billing_service
from .ops.request_id import HEADER as REQUEST_ID_HEADER
from .ops.request_id import assign_request_id
from .service import BillingService

logger = logging.getLogger("ciris_billing_proxy")


def credit_gate(handler: Handler) -> Handler:
    """Decorate an aiohttp handler so each successful call costs the caller one use.

    The caller's token is checked as `get_identity` does. Without credit the handler does not run
    and the client gets 402 (`insufficient_credit`), or 503 when the provider cannot answer. The use
    is taken before the handler runs and given back when it raises or answers with a 4xx/5xx. Roles
    in `gate_bypass_roles` pass free.
    The key spent under is `request[SPEND_KEY]` (`ciris_billing_proxy.keys`). Needs
    `setup_billing()` on the handler's application or one it is mounted in (`RuntimeError`
    otherwise).
    """

    @functools.wraps(handler)
    async def gated(request: web.Request) -> web.StreamResponse:
        rid = assign_request_id(request)
        response = await _gated(handler, request)
        response.headers[REQUEST_ID_HEADER] = rid  # no effect on a response already sent
        return response

    return gated


async def _gated(handler: Handler, request: web.Request) -> web.StreamResponse:
    """The gate's own refusals (401, 402, 503) are returned, never raised: the gate runs inside the
    host's middlewares, and one that rewrites every `HTTPException` would drop their bodies and
    `WWW-Authenticate`. What the host's handler raises is the host's, and passes on as it is."""
    service = billing_service(request)
    try:
        identity = identity_of_request(request, service.verifier)
    except HTTPJSONError as exc:
        return exc.reply()
    if identity.role in service.config.gate_bypass_roles:
        return await handler(request)
    if service.provider.id_token_required and id_token_of(request) is None:
        return to_http(IdTokenRequired(MISSING), gate=True).reply()
    if not service.provider.gate_charges:
        refused = await _check_credit(service, request, identity)
        return refused if refused is not None else await handler(request)
    # Server-made, never client-supplied: a reusable client key would let a user replay it for
    # free interactions.
    key = uuid.uuid4().hex
    try:
        with id_token_scope(request):
            await service.spend(identity, key)
    except BillingError as exc:
        return to_http(exc, gate=True).reply()
    request[SPEND_KEY] = key
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            await _give_back(service, identity, key)
        raise
    except BaseException as exc:
        await _give_back(service, identity, key)
        if client_left(request, exc):
            return client_gone(request).reply()
        raise
    if response.status >= 400:
        await _give_back(service, identity, key)
    return response


async def _check_credit(
    service: BillingService, request: web.Request, identity: Identity
) -> web.Response | None:
    """The informational gate: a 402 without credit (returned), nothing taken with it."""
    try:
        with id_token_scope(request):
            status = await service.credit_status(identity)
        if not status.has_credit:
            raise InsufficientCredit(status.reason or "No free uses or credits remaining")
    except BillingError as exc:
        return to_http(exc, gate=True).reply()
    return None


async def _give_back(service: BillingService, identity: Identity, key: str) -> None:
    try:
        await service.give_back(identity, key)
    except BillingError:
        # The interaction already failed; a failed refund must not replace that error. The log line
        # names the request key, so an operator can reconcile it.
        logger.warning("Could not give back the use spent under request key %s", key)
