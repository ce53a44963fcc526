"""The billing UI kit's files, served by the plugin: `GET {prefix}/ui/billing.js` and `billing.d.ts`.

They are public (a `<script>` tag sends no token), cacheable (ETag, `Cache-Control`) and readable
from any origin: module scripts are fetched in CORS mode, and the page that sells credits is often
served from another origin than the agent. Only the files named in `SERVED` exist under `/ui/`;
any other name is a JSON 404, so no path reaches the file system.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Final

from aiohttp import web

from ..errors import http_error

#: File name -> content type. `fake-stripe.js` ships beside them but only `serve --fake-backend`
#: serves it (`testing.fake_stripe`).
SERVED: Final = {
    "billing.js": "text/javascript",
    "billing.d.ts": "application/typescript",
}
#: Short enough that an upgrade of the package shows within minutes; the ETag makes a check cheap.
CACHE_CONTROL: Final = "public, max-age=300"


def read_file(name: str) -> bytes:
    """A file of the kit, as installed with the package."""
    return resources.files(__name__).joinpath(name).read_bytes()


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def load(cls, name: str, content_type: str) -> StaticFile:
        body = read_file(name)
        return cls(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    def reply(self, request: web.Request) -> web.Response:
        headers = {
            "ETag": self.etag,
            "Cache-Control": CACHE_CONTROL,
            "Access-Control-Allow-Origin": "*",
            "X-Content-Type-Options": "nosniff",
        }
        if _matches(request.headers.get("If-None-Match"), self.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, content_type=self.content_type, charset="utf-8", headers=headers)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison, and `*` matches any current file."""
    if if_none_match is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


class UIFiles:
    """The kit's files, read once when the routes are added."""

    def __init__(self) -> None:
        self._files = {name: StaticFile.load(name, kind) for name, kind in SERVED.items()}

    async def serve(self, request: web.Request) -> web.Response:
        found = self._files.get(request.match_info["name"])
        if found is None:
            raise http_error(404, "Not Found")
        return found.reply(request)
