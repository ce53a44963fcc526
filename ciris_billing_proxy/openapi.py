"""The API described as OpenAPI 3.1, generated from the operations the routes are registered from
(`routes.BILLING_OPERATIONS`, `auth_routes.AUTH_OPERATIONS`) and the pydantic models they read and
reply with: no schema is written twice.

Served at `{prefix}/openapi.json` without a token; `ciris-billing-proxy openapi` prints it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .auth_routes import auth_paths
from .credit_routes import CREDIT_OPERATIONS
from .models import ErrorReply
from .operations import IntQuery, Operation, TextParam, TextQuery
from .paths import DEFAULT_TOOLS_PREFIX
from .routes import BILLING_OPERATIONS, OPENAPI, UI_FILE
from .tool_routes import TOOL_OPERATIONS
from .version import __version__

OPENAPI_VERSION: Final = "3.1.0"
#: How long a client may reuse the document: it changes only when the server is upgraded.
CACHE_CONTROL: Final = "public, max-age=300"
_SCHEMAS: Final = "#/components/schemas/{model}"
#: Headers that come with an error status (on routes that need a token, for the 401).
_BEARER_CHALLENGE: Final = {
    "WWW-Authenticate": {
        "description": '`Bearer`, or `Bearer error="invalid_token"` for a token that was refused.',
        "required": True,
        "schema": {"type": "string", "pattern": "^Bearer"},
    }
}
_ERROR_HEADERS: Final[dict[int, dict[str, Any]]] = {
    408: {
        "Connection": {
            "description": "`close`: the rest of a late body is not read.",
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "Seconds until a login is admitted again.",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
}


def openapi_document(
    prefix: str,
    login_path: str | None = None,
    *,
    ui: bool = True,
    tools_prefix: str = DEFAULT_TOOLS_PREFIX,
    extra: Iterable[Operation] = (),
) -> dict[str, Any]:
    """The document for billing routes under `prefix` (the UI kit's files with `ui`), the tool
    routes under `tools_prefix`, the provider's own routes (`extra`, under `prefix`) and, when
    `login_path` is given, the auth routes (login there, logout, refresh and me beside it). Paths
    are full paths from the root."""
    placed = [(op, prefix + op.path) for op in BILLING_OPERATIONS if ui or op is not UI_FILE]
    placed += [(op, prefix + op.path) for op in CREDIT_OPERATIONS]
    placed += [(op, prefix + op.path) for op in extra]
    placed += [(op, tools_prefix + op.path) for op in TOOL_OPERATIONS]
    if login_path is not None:
        placed += [(op, path) for op, path in auth_paths(login_path).items()]
    refs, defs = _schemas(op for op, _ in placed)
    paths: dict[str, dict[str, Any]] = {}
    for op, path in placed:
        paths.setdefault(path, {})[op.method.lower()] = _operation(op, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "CIRIS agent billing API",
            "version": __version__,
            "description": "Credits, Stripe purchases and their status, and the transaction history "
            "of the signed-in user, as served by ciris-billing-proxy. Every error is JSON "
            '`{"detail": "..."}`; a path or method under the prefix that no route serves is a 404 '
            "or 405 (with `Allow`), after the token check.",
        },
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearer": []}],
    }


def _schemas(operations: Iterable[Operation]) -> tuple[dict[type[BaseModel], dict[str, Any]], dict[str, Any]]:
    """Each model's reference, and the schemas they refer to, from pydantic in one pass (so a model
    used by several operations, or nested in another, is one component)."""
    models: dict[type[BaseModel], None] = {ErrorReply: None}
    for op in operations:
        for model in (op.reply, op.body):
            if model is not None:
                models[model] = None
    # Validation mode for replies too: it states every field and bound, while serialization mode
    # would describe a custom serializer (CreditStatus leaves out unset extras) as a bare object.
    keyed, top = models_json_schema([(m, "validation") for m in models], ref_template=_SCHEMAS)
    refs = {model: keyed[(model, "validation")] for model in models}
    return refs, top.get("$defs", {})


def _operation(op: Operation, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    if op.reply is not None:
        content = _json(refs[op.reply])
    else:
        free_form = {"type": "object"} if op.media_types == ("application/json",) else {"type": "string"}
        content = {media_type: {"schema": free_form} for media_type in op.media_types}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    if op.links:
        responses["200"]["links"] = {
            target: {"operationId": target, "parameters": dict(parameters)}
            for target, parameters in op.links.items()
        }
    for status, when in sorted(op.bodiless.items()):
        responses[str(status)] = {"description": when}
    for status, when in sorted(op.errors.items()):
        response: dict[str, Any] = {"description": when, "content": _json(refs[ErrorReply])}
        headers = _BEARER_CHALLENGE if status == 401 and op.bearer else _ERROR_HEADERS.get(status)
        if headers:
            response["headers"] = headers
        responses[str(status)] = response
    parameters = [
        *(_parameter(p.name, "path", p.description, _text(p), required=True) for p in op.path_params),
        *(_parameter(q.name, "query", q.description, _query(q)) for q in op.query),
        *(_parameter(h.name, "header", h.description, _text(h)) for h in op.headers),
    ]
    document: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
    }
    if parameters:
        document["parameters"] = parameters
    if op.body is not None:
        document["requestBody"] = {"required": op.body_required, "content": _json(refs[op.body])}
    if not op.bearer:
        document["security"] = []
    return document


def _parameter(
    name: str, where: str, description: str, schema: dict[str, Any], *, required: bool = False
) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description, "schema": schema}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _text(param: TextParam | TextQuery) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^(?:{param.regex.pattern})$"}


def _query(param: IntQuery | TextQuery) -> dict[str, Any]:
    if isinstance(param, TextQuery):
        return _text(param) if param.format is None else {"type": "string", "format": param.format}
    return {"type": "integer", "minimum": param.low, "maximum": param.high, "default": param.default}


class APIDescription:
    """The `{prefix}/openapi.json` handler. The document is built on the first request, when the
    application's mount point is final, and then served as the same bytes."""

    def __init__(
        self,
        prefix: str,
        login_path: str | None,
        *,
        ui: bool,
        tools_prefix: str = DEFAULT_TOOLS_PREFIX,
        extra: Iterable[Operation] = (),
    ) -> None:
        self._prefix = prefix
        self._extra = tuple(extra)
        self._login_path = login_path
        self._ui = ui
        self._tools_prefix = tools_prefix
        self._body: bytes | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if self._body is None:
            resource = request.match_info.route.resource
            assert resource is not None  # the route was added by path
            # aiohttp prefixes a mounted application's resources: what precedes ours is the mount point.
            mount = resource.canonical.removesuffix(self._prefix + OPENAPI.path)
            login_path = None if self._login_path is None else mount + self._login_path
            document = openapi_document(
                mount + self._prefix,
                login_path,
                ui=self._ui,
                tools_prefix=mount + self._tools_prefix,
                extra=self._extra,
            )
            self._body = json.dumps(document, indent=2).encode()
        return web.Response(
            body=self._body, content_type="application/json", headers={"Cache-Control": CACHE_CONTROL}
        )
