"""The demo's page at `/`: a login form that, once signed in, shows `<ciris-billing>` for the user."""

from __future__ import annotations

import html
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from ..config import BillingConfig
from ..errors import unguarded
from . import read_file


def demo_page(config: BillingConfig, *, provider: str | None = None) -> bytes:
    page = read_file("demo.html").decode()
    # Attribute and text values only (the script reads the attributes), each escaped.
    for placeholder, value in (
        ("__PREFIX__", config.prefix),
        ("__PROVIDER__", provider or config.provider),
    ):
        page = page.replace(placeholder, html.escape(value))
    return page.encode()


def add_demo_page(
    router: web.UrlDispatcher, page: bytes, guard: Callable[[Handler], Handler] = unguarded
) -> None:
    async def serve(_request: web.Request) -> web.Response:
        return web.Response(
            body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"}
        )

    router.add_get("/", guard(serve))
