"""The request id: one per request, carried by a context variable so that every log line written
while serving it (the package's, a provider's, the host's own) can name it.

Taken from the `X-Request-ID` header when the client or a proxy in front sends a usable one
(bounded, safe characters: it ends up in log lines), else made here: a per-process prefix and a
counter, so making one costs a string join, not a `uuid4()`. It is echoed in the reply's
`X-Request-ID` header.

The billing routes and the credit gate assign it themselves. A host that wants it on its own
routes too adds `request_id_middleware()` first in its middleware list, and `RequestIdFilter` to
its log handler to print it (`%(request_id)s`).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import istr

#: An `istr`, as aiohttp's own header names: its case-folded form is made once, not per use.
HEADER: Final = istr("X-Request-ID")
#: What a request id from outside may look like: short, and nothing that could forge a log line.
_ACCEPTED: Final = re.compile(r"[A-Za-z0-9._:/+=@\-]{1,128}")

#: The id of the request being served in this context (None outside a request).
current_request_id: ContextVar[str | None] = ContextVar("ciris_billing_request_id", default=None)


def _made_ids() -> Iterator[str]:
    """Ids for this process: `<8 random hex digits>-<counter>`, unique per process and, with the
    random prefix, across processes and restarts. A `map` over a counter: each id is made in C."""
    return map((secrets.token_hex(4) + "-{}").format, itertools.count(1))


class _Ids:
    """The process's id maker, replaced in a forked child (a worker never repeats its parent's)."""

    made: Iterator[str] = _made_ids()

    @classmethod
    def after_fork(cls) -> None:
        cls.made = _made_ids()


os.register_at_fork(after_in_child=_Ids.after_fork)


def assign_request_id(request: web.BaseRequest) -> str:
    """The request's id (the current one if an outer layer already assigned it), made current.
    The layers on the hot path inline the first step: `current_request_id.get() or
    assign_request_id(request)`."""
    current = current_request_id.get()
    if current is not None:
        return current
    sent = request.headers.get(HEADER)
    rid = sent if sent is not None and _ACCEPTED.fullmatch(sent) else next(_Ids.made)
    current_request_id.set(rid)
    return rid


def request_id_middleware() -> Middleware:
    """Give every request of the application an id (see the module's doc), echoed in the reply."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = assign_request_id(request)
        response = await handler(request)
        response.headers[HEADER] = rid  # no effect on a response already sent
        return response

    return middleware


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (`-` outside a request) to every record passing a handler it is added to:

    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [%(request_id)s] %(message)s"))
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True
