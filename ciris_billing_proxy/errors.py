"""The errors providers raise, and the one place where they (and every other failure) become HTTP.

Every error reply under the billing prefix is JSON `{"detail": ...}`. Details are plain, stable English
strings because existing clients match on words inside them ("Billing not enabled", "not found").
"""

from __future__ import annotations

import functools
import json
import logging
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .ops.logs import loggable
from .ops.request_id import HEADER as REQUEST_ID_HEADER
from .ops.request_id import assign_request_id, current_request_id
from .paths import PathScope, as_scope

logger = logging.getLogger("ciris_billing_proxy")


NOT_AUTHENTICATED: Final = "Not authenticated"
BILLING_DISABLED: Final = "Billing not enabled for this agent"
PAYMENT_NOT_FOUND: Final = "Payment not found"
BILLING_UNAVAILABLE: Final = "Billing service unavailable"
CREDIT_PROVIDER_UNAVAILABLE: Final = "Credit provider unavailable"
INTERNAL_ERROR: Final = "Internal server error"
CLIENT_GONE: Final = "The client closed the connection"


class BillingError(Exception):
    """Base of the errors a credit provider may raise; anything else is treated as a bug (500)."""


class BillingDisabled(BillingError):
    """This provider cannot sell credits."""


class PaymentNotFound(BillingError):
    """The payment id is unknown, malformed, or belongs to someone else (indistinguishable on purpose)."""


class ProviderUnavailable(BillingError):
    """The provider's backend cannot be reached or answered nonsense; the caller may retry later.

    `maybe_applied=False` says the failed call provably had no effect; by default a failure is
    taken to be ambiguous, and a failed spend is then reconciled with `give_back`.
    """

    def __init__(self, reason: str = "unavailable", *, maybe_applied: bool = True) -> None:
        super().__init__(reason)
        self.maybe_applied = maybe_applied


class InvalidRequest(BillingError):
    """The request cannot be served as asked. `detail` is shown to the user, so keep it plain."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class IdTokenRequired(BillingError):
    """The provider speaks to its backend with the user's ID token, and this request has none, or
    the backend refused it. `detail` names what is missing or wrong, never the token."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AlreadyProcessed(BillingError):
    """A store purchase that was redeemed before (a tool purchase verified again): nothing added.
    Answered 409, as the CIRIS agent answers it on its tool route."""

    def __init__(self, detail: str = "Purchase already processed") -> None:
        super().__init__(detail)
        self.detail = detail


class InsufficientCredit(BillingError):
    """The user has no credit left for this use."""

    def __init__(self, reason: str = "No free uses or credits remaining") -> None:
        super().__init__(reason)
        self.reason = reason


class TooManyRequests(BillingError):
    """The user asked for this too often; `retry_after` seconds until they may again (a 429)."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class HTTPJSONError(web.HTTPException):
    """An HTTP error whose body is `{"detail": ...}`; the status is chosen per instance.

    Raised inside the package, but never out of it: `error_middleware` and the credit gate
    *return* it as a plain response (`reply()`), so a host middleware that rewrites every
    `HTTPException` it catches never sees ours (see `reply`)."""

    def __init__(self, status: int, detail: Any, *, headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"detail": detail}),
            content_type="application/json",
            headers=headers,
        )
        self.detail = detail

    def reply(self) -> web.Response:
        """The same status, body and headers (`WWW-Authenticate`, `Retry-After`, `Allow`) as a
        response to return: a host's middleware sees it as a reply and passes it on unchanged.
        An error that closes its connection (`force_close()`, the 408) still does."""
        response = web.Response(status=self.status, body=self.body, headers=self.headers)
        if self.keep_alive is False:
            response.force_close()
        return response


def http_error(status: int, detail: Any, headers: Mapping[str, str] | None = None) -> HTTPJSONError:
    return HTTPJSONError(status, detail, headers=headers)


def to_http(exc: BillingError, *, gate: bool = False) -> HTTPJSONError:
    """Map a provider error to its HTTP reply. `gate=True` uses the credit gate's wording."""
    if isinstance(exc, InsufficientCredit):
        return http_error(
            402,
            {
                "error": "insufficient_credit",
                "message": "You do not have enough credit for this request.",
                "reason": exc.reason,
            },
        )
    if isinstance(exc, BillingDisabled):
        return http_error(403, BILLING_DISABLED)
    if isinstance(exc, PaymentNotFound):
        return http_error(404, PAYMENT_NOT_FOUND)
    if isinstance(exc, InvalidRequest):
        return http_error(400, exc.detail)
    if isinstance(exc, IdTokenRequired):
        return http_error(401, exc.detail)
    if isinstance(exc, TooManyRequests):
        return http_error(429, exc.detail, {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})
    if isinstance(exc, AlreadyProcessed):
        return http_error(409, exc.detail)
    return http_error(503, CREDIT_PROVIDER_UNAVAILABLE if gate else BILLING_UNAVAILABLE)


def client_gone(request: web.Request) -> HTTPJSONError:
    """The error for a request whose client has gone away: nobody reads it, but the access log shows
    a 400, not a 500. Clients close connections all the time, so this is one DEBUG line, no traceback."""
    logger.debug(
        "The client closed the connection during %s %s", loggable(request.method), loggable(request.path)
    )
    return http_error(400, CLIENT_GONE)


def client_left(request: web.Request, exc: BaseException) -> bool:
    """Whether `exc` is the client's connection failing because the client went away. A
    ConnectionError may also come from a connection the handler made itself; only a closed client
    connection makes it the client's doing."""
    return isinstance(exc, ConnectionError) and request.transport is None


def error_middleware(
    path_prefixes: tuple[str, ...] | PathScope | None = None,
    *,
    before: Callable[[web.Request], None] | None = None,
    requests: dict[tuple[object, int], int] | None = None,
) -> Middleware:
    """Turn every error under the given paths (all paths when None) into JSON `{"detail": ...}`,
    returned as a response (never raised: a host middleware outside this one passes it on as it
    is), and give each request its id (`ops.request_id`), echoed in `X-Request-ID`.

    A `BillingError` becomes its reply (`to_http`); aiohttp's own 404/405/413 become JSON with the
    same status; any other exception becomes a 500 "Internal server error" whose body reveals
    nothing (the traceback goes to the log only), unless it is the client's connection failing
    because the client went away (`client_gone`). `before(request)`, if given, runs first inside
    the same handling: the billing prefix passes its auth check here, so every billing request goes
    through one middleware layer instead of two. `requests`, if given, counts the answers by
    (route, status) for the metrics: one dict entry bumped per request.

    A tuple of prefixes is matched against the full request path; `setup_billing` passes a
    `PathScope` it rebases onto the application's mount point at startup.
    """
    scope = None if path_prefixes is None else as_scope(path_prefixes)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if scope is not None and not scope.covers(request.path):
            return await handler(request)
        rid = current_request_id.get() or assign_request_id(request)
        try:
            if before is not None:
                before(request)
            response = await handler(request)
        except HTTPJSONError as exc:
            response = exc.reply()
        except BillingError as exc:
            response = to_http(exc).reply()
        except web.HTTPException as exc:
            if exc.status < 400:
                if requests is not None:
                    key = (request.match_info.route, exc.status)
                    requests[key] = requests.get(key, 0) + 1
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = http_error(exc.status, exc.reason, headers).reply()
        except Exception as exc:
            if client_left(request, exc):
                response = client_gone(request).reply()
            else:
                logger.exception("Unhandled error in %s %s", request.method, request.path)
                response = http_error(500, INTERNAL_ERROR).reply()
        response.headers[REQUEST_ID_HEADER] = rid  # no effect on a response already sent
        if requests is not None:
            key = (request.match_info.route, response.status)
            try:  # cheaper than .get() on the hot path, where the key is nearly always there
                requests[key] += 1
            except KeyError:
                requests[key] = 1
        return response

    return middleware


def guarded(handler: Handler, middleware: Middleware) -> Handler:
    """`handler` answered through `middleware` (an `error_middleware`), bound to the route instead
    of installed on the application. aiohttp runs no middleware machinery at all for a request
    when no application on its way has a middleware: the billing routes, their sub-apps and
    `serve` bind theirs this way, which saves a cached GET /credits about a sixth of its
    instructions (`bench.instructions`)."""
    # Named as `handler` (`__name__`, `__doc__`, `__wrapped__`), as aiohttp names its own layers.
    return functools.update_wrapper(functools.partial(middleware, handler=handler), handler)


def unguarded(handler: Handler) -> Handler:
    """`handler` as it is: for an application whose installed middleware answers its errors."""
    return handler


class RouteGuards:
    """The billing error middleware bound per route (`guarded`): `protected(handler)` passes the
    token check first, `public(handler)` (the API description, the UI files) does not."""

    def __init__(self, protected: Middleware, public: Middleware) -> None:
        self._protected = protected
        self._public = public

    def protected(self, handler: Handler) -> Handler:
        return guarded(handler, self._protected)

    def public(self, handler: Handler) -> Handler:
        return guarded(handler, self._public)


#: The routes that answer every path and method nothing else serves with a JSON 404/405 (the
#: billing and tool prefixes', `serve`'s own): what they allow is not an `Allow` of any path.
CATCH_ALLS: weakref.WeakSet[web.AbstractResource] = weakref.WeakSet()


async def unmatched_reply(request: web.Request) -> web.Response:
    """The JSON 404, or 405 naming what the path allows, for a request no route of its router
    serves but a catch-all: raised, for the error middleware bound to the catch-all to answer."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource not in CATCH_ALLS:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise http_error(405, "Method Not Allowed", {"Allow": ",".join(sorted(allowed))})
    raise http_error(404, "Not Found")
