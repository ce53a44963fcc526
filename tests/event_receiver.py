"""A real webhook receiver on loopback for the event tests: it can be down (its port refuses
connections), failing (500), slow, or taking events; it checks every signature it is sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from ciris_billing_proxy.events import SignatureVerificationError, verify_signature

Mode = Literal["ok", "fail", "slow"]


@dataclass
class Attempt:
    at: float
    event_id: str
    status: int
    signed: bool


@dataclass
class Receiver:
    secret: str
    mode: Mode = "ok"
    slow_seconds: float = 30.0
    #: Every request, in order.
    attempts: list[Attempt] = field(default_factory=list)
    #: The bodies of the events taken (answered 2xx), in order, duplicates included.
    taken: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    #: Requests that arrived, answered or not (a slow one counts once it arrived).
    arrived: int = 0
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/billing?token=receiver-query-token-77"

    async def start(self) -> None:
        """Listen (on the same port as before, once it has one)."""
        app = web.Application()
        app.router.add_post("/hooks/billing", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening: connections to the port are refused until `start`."""
        runner, self._runner = self._runner, None
        self._release.set()  # a slow request answers now
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.arrived += 1
        body = await request.read()
        try:
            verify_signature(body, request.headers.get("X-CIRIS-Signature"), self.secret)
            signed = True
        except SignatureVerificationError:
            signed = False
        event_id = request.headers.get("X-CIRIS-Event-Id", "")
        if self.mode == "slow":
            self._release.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.slow_seconds)
        status = 500 if self.mode == "fail" or not signed else 200
        self.attempts.append(Attempt(time.monotonic(), event_id, status, signed))
        if status == 200:
            self.taken.append(json.loads(body))
        return web.json_response({"ok": status == 200}, status=status)

    def ids(self) -> list[str]:
        return [str(body["id"]) for body in self.taken]
