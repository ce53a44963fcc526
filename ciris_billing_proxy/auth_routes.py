"""The auth routes beside login: `POST logout`, `POST refresh` and `GET me` (the CIRIS SDK's
`client.auth.logout()`, `refresh_token()` and `get_current_user()`), and their registration.

Each needs a valid bearer token (401 JSON otherwise) and answers a bare JSON object.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import jwt
from aiohttp import web

from .auth import AuthError, TokenVerifier, bearer_token
from .bodies import expect_continue, read_model
from .config import BillingConfig
from .errors import http_error
from .identity import Identity
from .login import (
    CREATED_AT_CLAIM,
    MAX_LOGIN_BODY,
    Authenticator,
    LoginRoute,
    json_errors,
    require_method,
    token_reply,
)
from .models import LoginReply, LoginRequest, LogoutReply, LogoutRequest, RefreshRequest, UserInfoReply
from .operations import BEARER_ERRORS, BODY_ERRORS, EXPECT_FAILED, Operation
from .paths import DEFAULT_LOGIN_PATH, DEFAULT_LOGOUT_PATH, DEFAULT_ME_PATH, DEFAULT_REFRESH_PATH
from .routes import json_reply
from .throttle import LoginThrottle, MemoryLoginThrottle
from .token_limit import TokenIssueLimit

if TYPE_CHECKING:
    from .ops.metrics import Counts

#: What every signed-in user may do through this package; its own routes check nothing finer.
USER_PERMISSIONS: Final = ("view_billing", "purchase_credits")
#: Added for roles in `gate_bypass_roles`, which the credit gate does not charge.
BYPASS_PERMISSION: Final = "bypass_credit_gate"
#: Claims a refreshed token keeps: they decide whose account the token is (`oauth_provider` is the
#: identity namespace, so dropping it would move the user to another account) or what `me` shows.
CARRIED_CLAIMS: Final = (CREATED_AT_CLAIM, "oauth_provider", "tenant", "tenant_id")
_LAST_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z: datetime's limit

#: Their paths are the defaults; `auth_paths` places them beside another `login_path`.
LOGIN: Final = Operation(
    "login",
    "POST",
    DEFAULT_LOGIN_PATH,
    "Sign in with a username and password: a bearer token for the other routes.",
    LoginReply,
    {
        **BODY_ERRORS,
        400: "the body is empty or not JSON",
        401: "wrong username or password",
        417: EXPECT_FAILED,
        429: "too many failed logins for this username or from this address, or the user was given "
        "`token_issue_max_per_user` new tokens within the window; see `Retry-After`",
        500: "the host's authenticator failed",
        503: "the database keeping the failed-login counters (`database_url`) is unavailable",
    },
    "auth",
    body=LoginRequest,
    body_required=True,
    bearer=False,
)
#: Logout and refresh record the revocation in the store for every process before answering.
REVOCATION_UNAVAILABLE: Final = {
    503: "the database keeping revoked tokens is unavailable (the token is still refused by this process)"
}
LOGOUT: Final = Operation(
    "logout",
    "POST",
    DEFAULT_LOGOUT_PATH,
    'Revoke the presented token, in every process sharing the store; with `{"everywhere": true}`, '
    "every token of its user issued until now (their other devices and sessions too).",
    LogoutReply,
    {**BEARER_ERRORS, **BODY_ERRORS, **REVOCATION_UNAVAILABLE},
    "auth",
    body=LogoutRequest,
)
REFRESH: Final = Operation(
    "refresh",
    "POST",
    DEFAULT_REFRESH_PATH,
    "A new token for the presented one, which is revoked.",
    LoginReply,
    {
        **BEARER_ERRORS,
        **BODY_ERRORS,
        **REVOCATION_UNAVAILABLE,
        429: "the user was given `token_issue_max_per_user` new tokens within the window; see "
        "`Retry-After` (the presented token stays valid)",
    },
    "auth",
    body=RefreshRequest,
)
ME: Final = Operation(
    "me", "GET", DEFAULT_ME_PATH, "Who the presented token belongs to.", UserInfoReply, BEARER_ERRORS, "auth"
)
AUTH_OPERATIONS: Final = (LOGIN, LOGOUT, REFRESH, ME)


def auth_paths(login_path: str) -> dict[Operation, str]:
    """Where each auth route is: login at `login_path`; logout, refresh and me beside it
    (`/v1/auth/login` gives `/v1/auth/logout`, `/v1/auth/refresh`, `/v1/auth/me`)."""
    base = login_path.rstrip("/").rsplit("/", 1)[0]
    return {
        op: login_path if op is LOGIN else base + op.path[op.path.rindex("/") :] for op in AUTH_OPERATIONS
    }


#: Revokes a token in every process before returning (`BillingService.revoke_everywhere`).
Revoke = Callable[[str], Awaitable[None]]
#: Ends every session of a user in every process before returning (`BillingService.end_sessions`).
EndSessions = Callable[[tuple[str, str]], Awaitable[None]]


class SessionRoutes:
    def __init__(
        self,
        verifier: TokenVerifier,
        config: BillingConfig,
        revoke: Revoke,
        end_sessions: EndSessions,
        limit: TokenIssueLimit,
    ) -> None:
        self._verifier = verifier
        self._revoke = revoke
        self._end_sessions = end_sessions
        # Logouts are counted like new tokens: tokens issued elsewhere (another login, an identity
        # provider) escape the count of `limit`, and each revocation is kept until its token
        # expires. Past the count, a logout ends every session of the user instead: the same for
        # the token logged out, one entry for the user.
        self._revocations = TokenIssueLimit(
            config.token_issue_max_per_user, config.token_issue_window_seconds
        )
        self._limit = limit
        self._bypass_roles = config.gate_bypass_roles
        self._body_timeout = config.body_timeout_seconds

    async def logout(self, request: web.Request) -> web.Response:
        """Revoke exactly the presented token, or with `{"everywhere": true}` every token of its
        user issued until now, in every process before answering (503 when the database cannot
        record it). 200 with a JSON object rather than 204: older CIRIS SDKs parse every success
        reply as JSON."""
        require_method(request, LOGOUT.method)
        self._caller(request)
        body = await read_model(
            request, LogoutRequest, MAX_LOGIN_BODY, time_limit=self._body_timeout, empty_ok=True
        )
        # Checked again: another logout may have landed while the body was read.
        token, identity = self._caller(request)
        if body.everywhere or self._revocations.take(identity.key) is not None:
            await self._end_sessions(identity.key)
        else:
            await self._revoke(token)
        return json_reply(LogoutReply())

    async def refresh(self, request: web.Request) -> web.Response:
        require_method(request, REFRESH.method)
        self._caller(request)
        await read_model(
            request, RefreshRequest, MAX_LOGIN_BODY, time_limit=self._body_timeout, empty_ok=True
        )
        # Checked again: a logout of this token may have landed while the body was read.
        token, identity = self._caller(request)
        claims = _claims(token)
        extra: dict[str, Any] = {name: claims[name] for name in CARRIED_CLAIMS if name in claims}
        reply = token_reply(self._verifier, self._limit, identity.key, identity.role, identity.email, extra)
        await self._revoke(token)
        return reply

    async def me(self, request: web.Request) -> web.Response:
        require_method(request, ME.method)
        token, identity = self._caller(request)
        claims = _claims(token)
        created = _timestamp(claims.get(CREATED_AT_CLAIM)) or _timestamp(claims.get("iat")) or time.time()
        permissions = [*USER_PERMISSIONS]
        if identity.role in self._bypass_roles:
            permissions.append(BYPASS_PERMISSION)
        return json_reply(
            UserInfoReply(
                user_id=identity.user_id,
                username=identity.user_id,
                role=identity.role,
                permissions=permissions,
                created_at=datetime.fromtimestamp(created, UTC).isoformat(),
            )
        )

    async def expect_authenticated(self, request: web.Request) -> None:
        """`Expect: 100-continue` is granted only to a valid token."""
        self._caller(request)
        await expect_continue(request)

    def _caller(self, request: web.Request) -> tuple[str, Identity]:
        token = bearer_token(request)
        try:
            return token, self._verifier.verify(token)
        except AuthError as exc:
            raise http_error(401, exc.detail, {"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None


def _claims(token: str) -> dict[str, Any]:
    # Only for a token `verify` has just accepted: the identity keeps what billing needs, not
    # `iat` or the claims a refresh carries over.
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _timestamp(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value <= _LAST_TIMESTAMP else None


def add_auth_routes(
    router: web.UrlDispatcher,
    config: BillingConfig,
    verifier: TokenVerifier,
    authenticate: Authenticator,
    login_path: str,
    throttle: LoginThrottle | None,
    revoke: Revoke,
    end_sessions: EndSessions,
    counts: Counts,
) -> None:
    """Login at `login_path`; logout, refresh and me beside it (`auth_paths`). Each is registered
    for every method, so that a wrong one is a JSON 405 too. `revoke` revokes a token everywhere,
    `end_sessions` every token of a user; `counts` is where the metrics count their requests and
    failed logins."""
    paths = auth_paths(login_path)
    # One count for both: login and refresh are the two ways to a new token.
    limit = TokenIssueLimit.from_config(config)
    login = LoginRoute(
        authenticate, verifier, throttle or MemoryLoginThrottle.from_config(config), limit, config, counts
    )
    sessions = SessionRoutes(verifier, config, revoke, end_sessions, limit)
    authenticated = sessions.expect_authenticated
    requests = counts.requests
    router.add_route("*", paths[LOGIN], json_errors(login.login, requests), expect_handler=expect_continue)
    router.add_route("*", paths[LOGOUT], json_errors(sessions.logout, requests), expect_handler=authenticated)
    router.add_route(
        "*", paths[REFRESH], json_errors(sessions.refresh, requests), expect_handler=authenticated
    )
    router.add_route("*", paths[ME], json_errors(sessions.me, requests), expect_handler=authenticated)
