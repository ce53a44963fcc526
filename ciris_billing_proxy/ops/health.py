"""Liveness and readiness: what a load balancer or an orchestrator asks before sending traffic.

`GET /healthz` answers 200 while the process serves HTTP at all. `GET /readyz` answers 200 only
when billing can work: the service has started and is not shutting down, the store answers a round
trip, the change feed hears the other processes, and the provider's `health()` says ready (the
`ciris` provider: its backend answers and accepts the API key). Otherwise 503, naming each check
that failed and why, in words that never carry a URL or a secret.

`BillingService.health()` gives a host the same answer; `add_health_routes(app)` adds both routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final, Literal

from aiohttp import web
from pydantic import BaseModel

from ..errors import ProviderUnavailable
from ..keys import billing_service

if TYPE_CHECKING:
    from ..service import BillingService

logger = logging.getLogger("ciris_billing_proxy")

#: The most one check may take; a check still running then counts as failed. Probes should allow a
#: little more than this (e.g. Kubernetes `timeoutSeconds: 5`).
CHECK_SECONDS: Final = 3.0
ALIVE_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"
OK: Final = "ok"


class Health(BaseModel):
    """The readiness answer: every check's result, `"ok"` or why not."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str]

    @property
    def ready(self) -> bool:
        return self.status == OK

    @property
    def detail(self) -> str:
        """One line naming what is not ready ("" when ready), e.g. for a log."""
        return "; ".join(f"{name}: {result}" for name, result in self.checks.items() if result != OK)

    def body(self) -> dict[str, object]:
        """The JSON the readiness route answers (with `detail` when not ready)."""
        body: dict[str, object] = self.model_dump()
        if not self.ready:
            body["detail"] = f"not ready: {self.detail}"
        return body


async def readiness(service: BillingService) -> Health:
    """Run every check at once, each within `CHECK_SECONDS`."""
    names = ("service", "store", "change_feed", "provider")
    results = await asyncio.gather(_lifecycle(service), _store(service), _feed(service), _provider(service))
    checks = dict(zip(names, results, strict=True))
    return Health(status="ok" if all(r == OK for r in results) else "unavailable", checks=checks)


async def _lifecycle(service: BillingService) -> str:
    return service.lifecycle


async def _store(service: BillingService) -> str:
    if service.feed is None:
        return OK  # nothing shared to reach: the provider's own health covers its records
    return await _bounded(service.feed.ping(), "store")


async def _feed(service: BillingService) -> str:
    if service.feed is None or service.feed_listening:
        return OK
    return "not hearing the other processes (reconnecting)"


async def _provider(service: BillingService) -> str:
    return await _bounded(service.provider.health(), f"provider {service.provider.name!r}")


async def _bounded(check: Awaitable[object], what: str) -> str:
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            result = await check
    except TimeoutError:
        return f"no answer within {CHECK_SECONDS:g} s"
    except ProviderUnavailable as exc:
        return f"unavailable ({exc})"
    except Exception as exc:
        # A bug in a check must not take the readiness route down with a 500.
        logger.warning("The %s health check failed: %s", what, type(exc).__name__)
        return f"check failed ({type(exc).__name__})"
    if result is None:
        return OK
    if isinstance(result, str) and result:
        return result
    logger.warning("The %s health check returned %s; expected None or text", what, type(result).__name__)
    return "check failed (bad answer)"


async def alive(_request: web.Request) -> web.Response:
    return web.json_response({"status": OK})


async def ready(request: web.Request) -> web.Response:
    health = await billing_service(request).health()
    return web.json_response(health.body(), status=200 if health.ready else 503)


def add_health_routes(
    app: web.Application, *, alive_path: str = ALIVE_PATH, ready_path: str = READY_PATH
) -> None:
    """Add `GET /healthz` (alive) and `GET /readyz` (ready: 200, or 503 naming what is not) to
    `app`, with no token needed. `setup_billing()` must have been called on `app` or on an
    application it is mounted in."""
    app.router.add_get(alive_path, alive)
    app.router.add_get(ready_path, ready)
