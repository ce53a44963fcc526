"""The demo's page at `/`: a login form that, once signed in, shows `<ciris-billing>` for the user."""

from __future__ import annotations

import html
from typing import Final

from aiohttp import web

from ..config import BillingConfig
from . import read_file

#: Where `<ciris-billing>` loads Stripe.js from unless told otherwise (the real one).
STRIPE_JS: Final = "https://js.stripe.com/v3/"


def demo_page(config: BillingConfig, *, stripe_js: str = STRIPE_JS, provider: str | None = None) -> bytes:
    page = read_file("demo.html").decode()
    # Attribute and text values only (the script reads the attributes), each escaped.
    for placeholder, value in (
        ("__PREFIX__", config.prefix),
        ("__STRIPE_JS__", stripe_js),
        ("__PROVIDER__", provider or config.provider),
    ):
        page = page.replace(placeholder, html.escape(value))
    return page.encode()


def add_demo_page(router: web.UrlDispatcher, page: bytes) -> None:
    async def serve(_request: web.Request) -> web.Response:
        return web.Response(
            body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"}
        )

    router.add_get("/", serve)
