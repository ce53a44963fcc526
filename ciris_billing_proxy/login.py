"""The optional `POST /v1/auth/login` route, for agents that have no login of their own.

The reply is the bare object existing CIRIS clients read (`access_token`, `token_type`, `expires_in`,
`user_id`, `role`). A stale `Authorization` header on this call is ignored. Failed logins are
throttled per username and per client address (`throttle`): a locked username or address is
answered 429 before any password is checked, the same way whether the username exists or not.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import TokenVerifier
from .bodies import read_model
from .client_address import Network, client_address
from .config import BillingConfig
from .errors import HTTPJSONError, error_middleware, guarded, http_error
from .models import LoginReply, LoginRequest
from .ops.audit import AuditKind, AuditTrail
from .ops.logs import FaultLog, loggable
from .routes import json_reply
from .throttle import LoginAttempt, LoginThrottle
from .token_limit import TOO_MANY_TOKENS, TokenIssueLimit

MAX_LOGIN_BODY: Final = 8 * 1024
TOO_MANY_LOGIN_ATTEMPTS: Final = "Too many login attempts"
faults = FaultLog(logging.getLogger("ciris_billing_proxy"))

#: The claim carrying the user's creation time (seconds since the epoch), for `GET /v1/auth/me`.
CREATED_AT_CLAIM: Final = "created_at"

if TYPE_CHECKING:
    from .ops.metrics import Counts


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    user_id: str
    role: str = "OBSERVER"
    email: str | None = None
    #: When the account was created, if the user store knows (a naive datetime is taken as UTC).
    created_at: datetime | None = None


#: `authenticate(username, password)`: the user, or None for bad credentials.
Authenticator = Callable[[str, str], Awaitable[AuthenticatedUser | None]]


def json_errors(handler: Handler, requests: dict[tuple[object, int], int] | None = None) -> Handler:
    """`handler` with every error as JSON `{"detail": ...}`: these routes live on the host's app,
    which may have no JSON error middleware of its own. `requests` counts answers for the metrics."""
    return guarded(handler, error_middleware(requests=requests))


def require_method(request: web.Request, method: str) -> None:
    # The auth routes are registered for every method so that a wrong one is a JSON 405 too.
    if request.method != method:
        raise http_error(405, "Method Not Allowed", {"Allow": method})


def retry_after(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait)))}


def token_reply(
    verifier: TokenVerifier,
    limit: TokenIssueLimit,
    user: tuple[str, str],
    role: str,
    email: str | None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    """A new token for `user` (namespace, user id), or 429 when they had their share (`token_limit`)."""
    wait = limit.take(user)
    if wait is not None:
        raise http_error(429, TOO_MANY_TOKENS, retry_after(wait))
    user_id = user[1]
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
        limit: TokenIssueLimit,
        config: BillingConfig,
        counts: Counts,
        audit: AuditTrail,
    ) -> None:
        self._counts = counts
        self._audit = audit
        self._authenticate = authenticate
        self._verifier = verifier
        self._limit = limit
        self._namespace = config.identity_namespace
        self._throttle = throttle
        self._trusted_proxies: Sequence[Network] = config.trusted_proxies
        self._body_timeout = config.body_timeout_seconds

    async def login(self, request: web.Request) -> web.Response:
        require_method(request, "POST")
        body = await read_model(request, LoginRequest, MAX_LOGIN_BODY, time_limit=self._body_timeout)
        address = client_address(request, self._trusted_proxies)
        attempt = LoginAttempt(body.username, address)
        # Not the name as typed: a password typed into the name field by mistake would be kept in
        # the audit trail. Its digest still tells attempts on one name apart, and an operator finds
        # a suspected name's with `tried_name_digest`.
        tried = f"{self._namespace}:{tried_name_digest(body.username)}"
        wait = await self._throttle.admit(attempt)
        if wait is not None:
            self._counts.login_lockouts += 1
            faults.warning(
                "Login refused: too many failed attempts for a username or from %s", loggable(address)
            )
            self._audit.record(AuditKind.LOGIN_LOCKED, tried, "refused", reference=address)
            raise http_error(429, TOO_MANY_LOGIN_ATTEMPTS, retry_after(wait))
        # From here the attempt counts as a failure unless the password proves right, also when the
        # authenticator raises (a 500): an error is no licence for unlimited guesses.
        user = await self._authenticate(body.username, body.password)
        if user is None:
            self._counts.login_failures += 1
            faults.log(logging.INFO, "Failed login from %s", loggable(address))
            self._audit.record(AuditKind.LOGIN_FAILED, tried, "refused", reference=address)
            raise http_error(401, "Invalid credentials")
        await self._throttle.succeeded(attempt)
        extra = {CREATED_AT_CLAIM: _epoch_seconds(user.created_at)} if user.created_at else None
        user_key = (self._namespace, user.user_id)
        audited = f"{self._namespace}:{user.user_id}"
        try:
            reply = token_reply(self._verifier, self._limit, user_key, user.role.upper(), user.email, extra)
        except HTTPJSONError:  # the user had their share of new tokens (429)
            self._audit.record(AuditKind.LOGIN_LIMITED, audited, "refused", reference=address)
            raise
        self._audit.record(AuditKind.LOGIN_OK, audited, "ok", reference=address)
        return reply


def _epoch_seconds(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def tried_name_digest(username: str) -> str:
    """What the audit trail records of the name a failed or refused login tried: `name-sha256:`
    and the first 16 hex digits of the SHA-256 of the name as typed (UTF-8), never the name."""
    return "name-sha256:" + hashlib.sha256(username.encode()).hexdigest()[:16]
