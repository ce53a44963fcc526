"""The routes of this package as data: what each one takes and every status it can answer.

The routes are registered at these operations' paths and read their parameters through them, the
OpenAPI document (`openapi.py`) is generated from them, and the tests drive every status listed here
over real HTTP. A route, parameter or status therefore cannot be added to one without the others.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from pydantic import BaseModel

from .errors import http_error


@dataclass(frozen=True, slots=True)
class IntQuery:
    """A bounded integer query parameter; out of range is a 422, never silently clamped."""

    name: str
    default: int
    low: int
    high: int
    description: str

    def read(self, request: web.Request) -> int:
        raw = request.query.get(self.name)
        if raw is None:
            return self.default
        digits = raw.lstrip("0") or ("0" if raw else "")
        # Plain ASCII digits only (no signs, spaces or exponents), and short enough to convert cheaply.
        value = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 12 else -1
        if not self.low <= value <= self.high:
            raise http_error(
                422, f"Invalid request: {self.name} must be a whole number from {self.low} to {self.high}"
            )
        return value


@dataclass(frozen=True, slots=True)
class TextQuery:
    """An optional text query parameter that must match `regex` in full; otherwise a 422. With a
    `format` (an OpenAPI string format, e.g. `date`), the document states that instead of the
    pattern, and the route must accept every value of it."""

    name: str
    regex: re.Pattern[str]
    description: str
    format: str | None = None

    def read(self, request: web.Request) -> str | None:
        raw = request.query.get(self.name)
        if raw is None:
            return None
        if self.regex.fullmatch(raw) is None:
            # The description says what is allowed (never the value sent: it is the client's).
            raise http_error(422, f"Invalid request: {self.name} is not valid: {self.description}")
        return raw


@dataclass(frozen=True, slots=True)
class TextParam:
    """A path or header parameter that must match `regex` in full."""

    name: str
    regex: re.Pattern[str]
    description: str

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


@dataclass(frozen=True, slots=True, eq=False)
class Operation:
    """One method on one path. `path` is below the prefix for a billing route, and the default path
    for an auth route (`auth_routes.auth_paths` places them beside the configured login path)."""

    operation_id: str
    method: str
    path: str
    summary: str
    #: The 200 reply's model; None for a free-form object (the OpenAPI document itself), or for
    #: text in `media_types`.
    reply: type[BaseModel] | None
    #: Every error status the route can answer, with when. Each is JSON `{"detail": "..."}`.
    errors: Mapping[int, str]
    tag: str
    body: type[BaseModel] | None = None
    body_required: bool = False
    query: tuple[IntQuery | TextQuery, ...] = ()
    path_params: tuple[TextParam, ...] = ()
    headers: tuple[TextParam, ...] = ()
    #: Whether a bearer token is required (a 401 with `WWW-Authenticate` without a valid one).
    bearer: bool = True
    #: OpenAPI links from the 200 reply: operation id -> {parameter: runtime expression}, so a
    #: client generator (and schemathesis' stateful phase) can follow a purchase to its status.
    links: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: The 200 reply's content types.
    media_types: tuple[str, ...] = ("application/json",)
    #: Statuses answered without a body (a 304), with when.
    bodiless: Mapping[int, str] = field(default_factory=dict)


#: Every route of this package checks `Expect:` before it reads anything.
EXPECT_FAILED: Final = "an `Expect` header other than `100-continue`"
#: The statuses of every route that needs a bearer token.
BEARER_ERRORS: Final[Mapping[int, str]] = {
    401: "no valid bearer token: missing, malformed, expired, revoked or badly signed",
    417: EXPECT_FAILED + " (after the token check)",
}
#: The statuses of every route that reads a JSON body.
BODY_ERRORS: Final[Mapping[int, str]] = {
    400: "the body is not JSON",
    408: "the body did not arrive within `body_timeout_seconds` (the connection is closed)",
    413: "the body is larger than the limit",
    422: "the body is not a JSON object of the documented shape",
}
PROVIDER_FAILED: Final = "the credit provider failed or is unreachable; retry later"
SELLING: Final = "the provider cannot sell credits (`Billing not enabled for this agent`)"
