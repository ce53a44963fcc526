"""The user's own Google/Apple ID token, for providers that speak to their backend as the user.

Native apps send it in `X-Google-ID-Token` or `X-Apple-ID-Token` beside the agent's bearer token, or
(the CIRIS apps) write it into the agent's environment: a provider that offers that token
(`CreditProvider.agent_id_token`) has it used for requests that carry none.
The billing routes and the credit gate put it in a context variable for the duration of one request
(`id_token_scope`), and a provider reads it with `current_id_token()`: provider method signatures stay
as they are, and tasks the request starts (a credit load shared by concurrent requests) see it too.
It is never stored anywhere else: not on the request, not in the credit cache, not in a log line.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

GOOGLE_HEADER: Final = "X-Google-ID-Token"
APPLE_HEADER: Final = "X-Apple-ID-Token"
#: Checked in this order when a request carries both.
HEADERS: Final = (GOOGLE_HEADER, APPLE_HEADER)
MISSING: Final = f"Missing {GOOGLE_HEADER} or {APPLE_HEADER} header"
REFUSED: Final = "The billing backend did not accept the ID token; sign in again"


@dataclass(frozen=True, slots=True)
class IdToken:
    """`header` says which header it came in (which issuer the app signed in with)."""

    header: str
    value: str = field(repr=False)
    #: True for the token configured for the agent (its environment), not sent with the request.
    from_agent: bool = False


_current: ContextVar[IdToken | None] = ContextVar("ciris_billing_proxy_id_token", default=None)


def current_id_token() -> IdToken | None:
    """The ID token of the request being served, if it sent one."""
    return _current.get()


def id_token_of(request: web.Request) -> IdToken | None:
    for header in HEADERS:
        value = request.headers.get(header, "").strip()
        if value:
            return IdToken(header, value)
    return None


def user_id_token(request: web.Request, agent: Callable[[], IdToken | None]) -> IdToken | None:
    """The request's ID token, else the agent's (`agent`: `CreditProvider.agent_id_token`)."""
    return id_token_of(request) or agent()


def id_token_scope(request: web.Request) -> IdTokenScope:
    """Make the request's ID token current until the block ends. aiohttp serves the requests of
    one keep-alive connection in one task, so the token is reset afterwards, not left for the next."""
    return IdTokenScope(id_token_of(request))


def id_token_as(token: IdToken | None) -> IdTokenScope:
    """Make `token` current until the block ends, as `id_token_scope` does for the request's."""
    return IdTokenScope(token)


class IdTokenScope:
    """`with id_token_scope(request) as token:` or `with id_token_as(token):`. A plain class rather
    than a generator-based context manager: the gate enters one per request, and this costs two
    method calls."""

    __slots__ = ("_reset", "_token")

    def __init__(self, token: IdToken | None) -> None:
        self._token = token
        self._reset: Token[IdToken | None] | None = None

    def __enter__(self) -> IdToken | None:
        self._reset = _current.set(self._token)
        return self._token

    def __exit__(self, *_exc: object) -> None:
        if self._reset is not None:
            _current.reset(self._reset)
