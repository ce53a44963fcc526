"""The optional `POST /v1/auth/login` route, for agents that have no login of their own.

The reply is the bare object existing CIRIS clients read (`access_token`, `token_type`, `expires_in`,
`user_id`, `role`). A stale `Authorization` header on this call is ignored. Failed logins are
throttled per username and per client address (`throttle`): a locked username or address is
answered 429 before any password is checked, the same way whether the username exists or not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import TokenVerifier
from .bodies import read_model
from .client_address import Network, client_address
from .errors import error_middleware, http_error
from .models import LoginReply, LoginRequest
from .ops.audit import AuditKind, AuditTrail
from .ops.logs import FaultLog
from .routes import json_reply
from .throttle import LoginAttempt, LoginThrottle

MAX_LOGIN_BODY: Final = 8 * 1024
#: Characters of a tried username kept in the audit trail.
MAX_LOGGED_NAME: Final = 64
TOO_MANY_LOGIN_ATTEMPTS: Final = "Too many login attempts"
faults = FaultLog(logging.getLogger("ciris_billing_proxy"))

#: The claim carrying the user's creation time (seconds since the epoch), for `GET /v1/auth/me`.
CREATED_AT_CLAIM: Final = "created_at"


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    user_id: str
    role: str = "OBSERVER"
    email: str | None = None
    #: When the account was created, if the user store knows (a naive datetime is taken as UTC).
    created_at: datetime | None = None


#: `authenticate(username, password)`: the user, or None for bad credentials.
Authenticator = Callable[[str, str], Awaitable[AuthenticatedUser | None]]


def json_errors(handler: Handler) -> Handler:
    """`handler` with every error as JSON `{"detail": ...}`: these routes live on the host's app,
    which may have no JSON error middleware of its own."""
    middleware = error_middleware()

    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await middleware(request, handler)

    return wrapped


def require_method(request: web.Request, method: str) -> None:
    # The auth routes are registered for every method so that a wrong one is a JSON 405 too.
    if request.method != method:
        raise http_error(405, "Method Not Allowed", {"Allow": method})


def token_reply(
    verifier: TokenVerifier,
    user_id: str,
    role: str,
    email: str | None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    token = verifier.issue(user_id, role=role, email=email, extra=extra)
    return json_reply(
        LoginReply(access_token=token, expires_in=verifier.token_ttl_seconds, user_id=user_id, role=role)
    )


class LoginRoute:
    def __init__(
        self,
        authenticate: Authenticator,
        verifier: TokenVerifier,
        throttle: LoginThrottle,
        trusted_proxies: Sequence[Network],
        body_timeout: float,
        audit: AuditTrail,
        namespace: str,
    ) -> None:
        self._audit = audit
        self._namespace = namespace
        self._authenticate = authenticate
        self._verifier = verifier
        self._throttle = throttle
        self._trusted_proxies = trusted_proxies
        self._body_timeout = body_timeout

    async def login(self, request: web.Request) -> web.Response:
        require_method(request, "POST")
        body = await read_model(request, LoginRequest, MAX_LOGIN_BODY, time_limit=self._body_timeout)
        address = client_address(request, self._trusted_proxies)
        attempt = LoginAttempt(body.username, address)
        # The name as typed, bounded: it is logged, and a password typed into it by mistake should
        # not be kept whole.
        tried = f"{self._namespace}:{body.username[:MAX_LOGGED_NAME]}"
        wait = await self._throttle.admit(attempt)
        if wait is not None:
            faults.warning("Login refused: too many failed attempts for a username or from %s", address)
            self._audit.record(AuditKind.LOGIN_LOCKED, tried, "refused", reference=address)
            raise http_error(429, TOO_MANY_LOGIN_ATTEMPTS, {"Retry-After": str(max(1, math.ceil(wait)))})
        # From here the attempt counts as a failure unless the password proves right, also when the
        # authenticator raises (a 500): an error is no licence for unlimited guesses.
        user = await self._authenticate(body.username, body.password)
        if user is None:
            faults.log(logging.INFO, "Failed login from %s", address)
            self._audit.record(AuditKind.LOGIN_FAILED, tried, "refused", reference=address)
            raise http_error(401, "Invalid credentials")
        await self._throttle.succeeded(attempt)
        self._audit.record(AuditKind.LOGIN_OK, f"{self._namespace}:{user.user_id}", "ok", reference=address)
        extra = {CREATED_AT_CLAIM: _epoch_seconds(user.created_at)} if user.created_at else None
        return token_reply(self._verifier, user.user_id, user.role.upper(), user.email, extra)


def _epoch_seconds(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())
