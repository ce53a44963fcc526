"""Requests aiohttp's HTTP parser refuses: one short log line and, where the server is ours, a JSON 400.

aiohttp logs a refused request at ERROR with its traceback, and the exception's message quotes the
offending bytes: part of an oversized header (a token), or, after a wrong `Content-Length` on a
keep-alive connection, the next request's body (a login's password). Its plain-text 400 echoes the
same bytes. Anyone can send such a request, so that is request bytes in the log at will.

`BadRequestLog` is a logger for aiohttp's server (`logger=` of `web.AppRunner`, or
`web.Application(handler_args={"logger": BadRequestLog()})`): a refused request becomes one
WARNING line naming the refusal's kind and the peer (at most one per `REPORT_EVERY_SECONDS`, with
the count of the others), never its bytes or a traceback; everything else passes on unchanged.
`ServeRunner` (what `serve` runs) uses it and answers JSON `{"detail": "Bad request"}` instead of
aiohttp's echo.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

#: Longest silence between two lines about refused requests while they keep coming.
REPORT_EVERY_SECONDS: Final = 10.0
BAD_REQUEST: Final = "Bad request"


class BadRequestLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger (`aiohttp.server`), without the bytes of requests its parser refuses."""

    def __init__(
        self, logger: logging.Logger | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})
        self._clock = clock
        self._reported_at = -REPORT_EVERY_SECONDS
        self._unreported = 0

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self._refused(exc, args[0] if args else None)
        else:
            super().log(level, msg, *args, **kwargs)

    def _refused(self, exc: HttpProcessingError, peer: object) -> None:
        self._unreported += 1
        now = self._clock()
        if now - self._reported_at < REPORT_EVERY_SECONDS:
            return
        count, self._unreported, self._reported_at = self._unreported, 0, now
        self.logger.warning(
            "Refused %d malformed HTTP request(s) (last: %s, status %s, from %s)",
            count,
            type(exc).__name__,
            exc.code,
            peer,
        )


class _JSONErrorRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        resp = web.json_response({"detail": BAD_REQUEST}, status=status)
        resp.force_close()
        return resp


class _JSONErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JSONErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ServeRunner(web.AppRunner):
    """An `AppRunner` whose server answers refused requests JSON `{"detail": "Bad request"}`
    (without echoing them) and logs them through `BadRequestLog`."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("logger", BadRequestLog())
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        kwargs: Mapping[str, Any] = made._kwargs
        return _JSONErrorServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **kwargs,
        )
