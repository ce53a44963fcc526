"""What `setup_billing` stored, looked up for a request, with a clear error when it never ran."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web

T = TypeVar("T")


def setup_value(request: web.Request, key: web.AppKey[T]) -> T:
    """`key` from the application serving `request` or any application it is mounted in."""
    try:
        return request.config_dict[key]
    except KeyError:
        # A plain KeyError naming a typed key would leave a host wondering what went wrong.
        raise RuntimeError(
            "call setup_billing() first: get_identity() and @credit_gate need it on the "
            "handler's application or on an application that application is mounted in"
        ) from None
