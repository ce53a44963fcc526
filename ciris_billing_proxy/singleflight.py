"""Single-flight: concurrent calls for one key share one running task.

Used by the credit cache (concurrent misses of one user share one provider call) and by the `ciris`
provider's purchases (concurrent initiates of one user share one PaymentIntent). Waiters are meant
to `await asyncio.shield(task)`, so a caller that goes away does not cancel the work for the others.
`forget(key)` lets the next call start afresh while the old task finishes on its own: a caller that
must not use a result started before some change compares `is_current(key)` from inside the task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self._running: set[asyncio.Task[V]] = set()

    def run(self, key: K, start: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """The task running for `key`, started with `start()` if there is none."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(start())
            self._inflight[key] = task
            self._running.add(task)
            task.add_done_callback(lambda done: self._finished(key, done))
        return task

    def is_current(self, key: K) -> bool:
        """Whether the calling task is still the one that `run` hands out for `key`."""
        return self._inflight.get(key) is asyncio.current_task()

    def forget(self, key: K) -> None:
        self._inflight.pop(key, None)

    def clear(self) -> None:
        self._inflight.clear()

    async def aclose(self) -> None:
        """Cancel and await every task still running, forgotten ones included."""
        self.clear()
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        self._running.discard(task)
        if self._inflight.get(key) is task:
            del self._inflight[key]
        # Mark a failure as seen: every waiter may have gone away (shielded), and asyncio would
        # otherwise log "exception was never retrieved" for an error each caller already got.
        if not task.cancelled():
            task.exception()
