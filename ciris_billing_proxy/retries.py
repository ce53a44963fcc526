"""Give-backs that could not be finished yet, retried in the background until they are.

A use is given back when the interaction it paid for failed. If the provider cannot do that right
now (its backend is down, or cannot yet say what the charge took), dropping the give-back would keep
a user's credit for an interaction that never happened. So it is retried, with backoff capped at
`max_interval` seconds: once the backend is back, the use is back within that interval. The
provider's `give_back` is idempotent per key, which makes every retry safe.

These retries live as long as the process; the give-back outbox (`ops/outbox.py`) is their durable
backing, from which the next process takes over whatever is still owed at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from .errors import BillingError, ProviderUnavailable
from .identity import Identity

logger = logging.getLogger("ciris_billing_proxy")

FIRST_INTERVAL = 0.5
#: Give-back attempts in flight at once: after an outage, owed give-backs go back to the backend a few
#: at a time rather than all in the same instant (the backend rate-limits the agent as a whole).
CONCURRENT_ATTEMPTS = 4


class GiveBackRetries:
    def __init__(self, give_back: Callable[[Identity, str], Awaitable[None]], *, max_interval: float) -> None:
        self._give_back = give_back
        self._max_interval = max_interval
        self._pending: dict[tuple[tuple[str, str], str], asyncio.Task[None]] = {}
        self._attempts = asyncio.Semaphore(CONCURRENT_ATTEMPTS)
        self._closed = False

    def __len__(self) -> int:
        return len(self._pending)

    def schedule(self, identity: Identity, key: str) -> bool:
        """Retry `give_back(identity, key)` until it succeeds (once per key, however often asked).
        After `aclose` nothing is retried any more: False."""
        if self._closed:
            logger.debug("Shutting down: the give-back for request key %s is not retried here", key)
            return False
        slot = (identity.key, key)
        if slot in self._pending:
            return True
        task = asyncio.ensure_future(self._retry(identity, key))
        self._pending[slot] = task
        task.add_done_callback(lambda _: self._pending.pop(slot, None))
        return True

    async def aclose(self) -> int:
        """Stop retrying (at shutdown); how many give-backs were still owed (each key at DEBUG)."""
        self._closed = True
        tasks = list(self._pending.items())
        for (_, key), task in tasks:
            task.cancel()
            logger.debug("Shutting down: the give-back for request key %s is not retried here", key)
        await asyncio.gather(*(task for _, task in tasks), return_exceptions=True)
        return len(tasks)

    async def _retry(self, identity: Identity, key: str) -> None:
        interval = min(FIRST_INTERVAL, self._max_interval)
        attempts = 0
        while True:
            # Jitter, so give-backs owed since one outage do not all retry in the same instant.
            await asyncio.sleep(interval * random.uniform(0.8, 1.0))  # noqa: S311 - not a secret
            attempts += 1
            try:
                async with self._attempts:
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
