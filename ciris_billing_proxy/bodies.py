"""Reading JSON request bodies into models: size-capped, and every failure a clear 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Final, TypeVar

from aiohttp import HttpVersion11, web
from pydantic import BaseModel, ValidationError

from .errors import client_gone, http_error

M = TypeVar("M", bound=BaseModel)

BODY_TIMEOUT: Final = "Request body not received in time"


async def expect_continue(request: web.Request) -> None:
    """aiohttp's `Expect: 100-continue` handling, with a JSON 417 for any other expectation.

    aiohttp runs a route's expect handler before any middleware, so its default 417 is plain text
    whatever error middleware the app has: pass this as `expect_handler=` to get JSON.
    """
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        raise http_error(417, "Only 'Expect: 100-continue' is supported")
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim line is not part of the response's size


async def read_body(request: web.Request, max_bytes: int, *, time_limit: float) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `max_bytes` (without reading it all).

    The whole body must arrive within `time_limit` seconds: a client that announces a body and then
    sends it slowly, or never, would otherwise hold its connection (and a file descriptor) for as
    long as it likes. It gets a 408 and the connection is closed.
    """
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise http_error(413, f"Request body too large (limit {max_bytes} bytes)")
    chunks: list[bytes] = []
    size = 0
    try:
        content = request.content
        if content.is_eof():
            # All of it has arrived already (nearly always, for a small body sent with its head):
            # nothing to wait for, so no timer is armed.
            raw = content.read_nowait()
            if len(raw) > max_bytes:
                raise http_error(413, f"Request body too large (limit {max_bytes} bytes)")
            return raw
        async with asyncio.timeout(time_limit):
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise http_error(413, f"Request body too large (limit {max_bytes} bytes)")
                chunks.append(chunk)
    except ConnectionError:  # the client closed the connection before sending the whole body
        raise client_gone(request) from None
    except TimeoutError:
        late = http_error(408, BODY_TIMEOUT)
        late.force_close()  # the rest of the body may still come: this connection is done
        raise late from None
    return b"".join(chunks)


async def read_model(
    request: web.Request,
    model: type[M],
    max_bytes: int,
    *,
    time_limit: float,
    empty_ok: bool = False,
    json_mode: bool = False,
) -> M:
    """Parse a JSON object body into `model`, read within `time_limit` seconds (see `read_body`).
    An empty body means `{}` when `empty_ok`. `json_mode`: only for a model whose fields pydantic
    validates alike from JSON and from Python (strings, whole numbers, booleans; not dates, UUIDs,
    enums, tuples or sets, which strict JSON validation reads from strings or arrays and strict
    Python validation refuses): validated by pydantic's JSON parser first."""
    raw = await read_body(request, max_bytes, time_limit=time_limit)
    if not raw.strip():
        if not empty_ok:
            raise http_error(400, "Request body is empty; send a JSON object")
        raw = b"{}"
    if json_mode:
        # pydantic's own JSON parser, straight into the model: a third of what `json.loads` and
        # validating the dict cost. A body it refuses goes the long way below, which says why in
        # the words it always did (and reads what only `json.loads` reads: UTF-16 or UTF-32, NaN).
        with contextlib.suppress(ValidationError):
            return model.model_validate_json(raw)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested thousands deep
        raise http_error(400, "Malformed JSON body") from None
    if not isinstance(data, dict):
        raise http_error(422, "Request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise http_error(422, describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """A plain sentence naming each bad field, never echoing the submitted values."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{field}: {err['msg']}")
    return "Invalid request: " + "; ".join(parts)
