"""The optional `POST /v1/auth/login` route, for agents that have no login of their own.

The reply is the bare object existing CIRIS clients read (`access_token`, `token_type`, `expires_in`,
`user_id`, `role`). A stale `Authorization` header on this call is ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from .auth import VERIFIER_KEY
from .bodies import read_model
from .errors import INTERNAL_ERROR, http_error
from .models import LoginReply, LoginRequest
from .routes import json_reply

logger = logging.getLogger("ciris_billing_proxy")

DEFAULT_LOGIN_PATH: Final = "/v1/auth/login"
MAX_LOGIN_BODY: Final = 8 * 1024


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    user_id: str
    role: str = "OBSERVER"
    email: str | None = None


#: `authenticate(username, password)`: the user, or None for bad credentials.
Authenticator = Callable[[str, str], Awaitable[AuthenticatedUser | None]]

AUTHENTICATOR_KEY: Final[web.AppKey[Authenticator]] = web.AppKey("ciris_billing_proxy.authenticator")


async def login(request: web.Request) -> web.Response:
    # Registered for every method: the host app has no JSON error middleware, and clients expect
    # `{"detail": ...}` from this path whatever they send.
    if request.method != "POST":
        raise http_error(405, "Method Not Allowed", {"Allow": "POST"})
    body = await read_model(request, LoginRequest, MAX_LOGIN_BODY)
    try:
        user = await request.config_dict[AUTHENTICATOR_KEY](body.username, body.password)
    except Exception:
        logger.exception("The login authenticator failed")
        raise http_error(500, INTERNAL_ERROR) from None
    if user is None:
        raise http_error(401, "Invalid credentials")
    verifier = request.config_dict[VERIFIER_KEY]
    role = user.role.upper()
    token = verifier.issue(user.user_id, role=role, email=user.email)
    return json_reply(
        LoginReply(
            access_token=token,
            expires_in=verifier.token_ttl_seconds,
            user_id=user.user_id,
            role=role,
        )
    )
