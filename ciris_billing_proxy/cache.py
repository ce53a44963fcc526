"""Short-lived credit-status cache: per-value TTL + LRU bound, single-flight loads, race-free invalidation.

Entries live in an `LRU` map as `(expires_at, value)`: the lifetime is chosen once, when the value
is stored, so a hit (`peek`) is one lookup in C and one comparison, with no coroutine. Expired
entries are dropped when met and count against the bound until then.

`cachetools` is not async-aware (its decorators would cache coroutine objects, and its locks block the
loop), so loads go through `SingleFlight` on top of it:

* concurrent misses for one identity share one provider call (waiters are shielded, so a caller that
  goes away does not cancel the load for the others);
* a failed load is shared by its waiters and never cached;
* `invalidate()` forgets the entry *and* the in-flight load, and a load only stores its result if it is
  still the current load for that key, so a load that started before an invalidation can never write a
  stale value after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .identity import Identity
from .lru import LRU
from .singleflight import SingleFlight

V = TypeVar("V")


class CreditCache(Generic[V]):
    def __init__(
        self,
        load: Callable[[Identity], Awaitable[V]],
        *,
        ttl: float,
        maxsize: int,
        timer: Callable[[], float] = time.monotonic,
        ttl_of: Callable[[V], float] | None = None,
    ) -> None:
        """`ttl_of(value)`, when given, chooses each value's lifetime (e.g. shorter for "no credit")."""
        self._load = load
        self._ttl = ttl
        self._ttl_of = ttl_of
        self._timer = timer
        self._entries: LRU[tuple[str, str], tuple[float, V]] = LRU(maxsize)
        self._loads: SingleFlight[tuple[str, str], V] = SingleFlight()
        self._max_lifetime: float | None = None
        #: Lookups answered from the cache, and lookups that loaded (the metrics read them).
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, identity: Identity) -> V | None:
        """The fresh cached value, or None (values are never None): the hit path, run on every
        cached request, so plain calls only (no coroutine, nothing scheduled)."""
        key = identity.key
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] > self._timer():
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        del self._entries[key]
        return None

    async def get(self, identity: Identity) -> V:
        value = self.peek(identity)
        if value is not None:
            return value
        key = identity.key
        self.misses += 1
        return await asyncio.shield(self._loads.run(key, lambda: self._fill(identity)))

    def invalidate(self, identity: Identity) -> None:
        self.invalidate_key(identity.key)

    def invalidate_key(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)
        self._loads.forget(key)

    def limit_lifetime(self, seconds: float | None) -> None:
        """Keep entries at most `seconds` from now on (`None`: their normal lifetime), and drop
        every entry and load so far: for while changes made elsewhere may go unheard."""
        self._max_lifetime = seconds
        self.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._loads.clear()

    async def aclose(self) -> None:
        """Cancel and await every load still running (including ones orphaned by `invalidate`)."""
        self._entries.clear()
        await self._loads.aclose()

    async def _fill(self, identity: Identity) -> V:
        value = await self._load(identity)
        if self._loads.is_current(identity.key):
            lifetime = self._ttl if self._ttl_of is None else self._ttl_of(value)
            if self._max_lifetime is not None:
                lifetime = min(lifetime, self._max_lifetime)
            self._entries[identity.key] = (self._timer() + lifetime, value)
        return value
