"""Give-backs that could not be finished yet, retried in the background until they are.

A use is given back when the interaction it paid for failed. If the provider cannot do that right
now (its backend is down, or cannot yet say what the charge took), dropping the give-back would keep
a user's credit for an interaction that never happened. So it is retried, with backoff capped at
`max_interval` seconds: once the backend is back, the use is back within that interval. The
provider's `give_back` is idempotent per key, which makes every retry safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .errors import BillingError, ProviderUnavailable
from .identity import Identity

logger = logging.getLogger("ciris_billing_proxy")

FIRST_INTERVAL = 0.5


class GiveBackRetries:
    def __init__(self, give_back: Callable[[Identity, str], Awaitable[None]], *, max_interval: float) -> None:
        self._give_back = give_back
        self._max_interval = max_interval
        self._pending: dict[tuple[tuple[str, str], str], asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def schedule(self, identity: Identity, key: str) -> None:
        """Retry `give_back(identity, key)` until it succeeds (once per key, however often asked)."""
        slot = (identity.key, key)
        if slot in self._pending:
            return
        task = asyncio.ensure_future(self._retry(identity, key))
        self._pending[slot] = task
        task.add_done_callback(lambda _: self._pending.pop(slot, None))

    async def aclose(self) -> None:
        """Stop retrying (at shutdown), naming every give-back that is still owed."""
        tasks = list(self._pending.items())
        for (_, key), task in tasks:
            task.cancel()
            logger.warning(
                "Shutting down: the give-back for request key %s is not retried again; "
                "its use may not have been given back",
                key,
            )
        await asyncio.gather(*(task for _, task in tasks), return_exceptions=True)

    async def _retry(self, identity: Identity, key: str) -> None:
        interval = min(FIRST_INTERVAL, self._max_interval)
        attempts = 0
        while True:
            await asyncio.sleep(interval)
            attempts += 1
            try:
                await self._give_back(identity, key)
            except ProviderUnavailable:
                interval = min(interval * 2, self._max_interval)
                logger.debug("Give-back for request key %s failed again (attempt %d)", key, attempts)
                continue
            except BillingError as exc:
                logger.warning(
                    "Gave up giving back the use spent under request key %s: %s", key, type(exc).__name__
                )
                return
            logger.info("Gave back the use spent under request key %s after %d retries", key, attempts)
            return
