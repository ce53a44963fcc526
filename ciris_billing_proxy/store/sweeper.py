"""A background task deleting expired rows now and then: records that must not outlive their window
(a replay's Stripe client secret, a login window) are gone from the database soon after it closes,
also for users who never come back. Reads never rely on it: they ignore expired rows themselves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from ..errors import ProviderUnavailable
from ..ops.logs import FaultLog

logger = logging.getLogger("ciris_billing_proxy")
#: Fault lines an outage repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logger)

SWEEP_EVERY_SECONDS: Final = 60.0


class Sweeper:
    def __init__(self, sweep: Callable[[], Awaitable[int]], what: str) -> None:
        self._sweep = sweep
        self._what = what
        self._task: asyncio.Task[None] | None = None

    def start(self, every: float = SWEEP_EVERY_SECONDS) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run(every))

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, every: float) -> None:
        while True:
            try:
                await self._sweep()
            except ProviderUnavailable:
                pass  # the database is away; the next round tries again
            except Exception as exc:
                faults.error("Could not delete expired records: %s (%s)", self._what, type(exc).__name__)
            await asyncio.sleep(every)
