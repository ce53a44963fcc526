"""The credit cache: single-flight, shared-but-uncached failures, race-free invalidation, bounds."""

from __future__ import annotations

import asyncio

import pytest

from ciris_billing_proxy import Identity
from ciris_billing_proxy.cache import CreditCache

ANN = Identity("ann", "local", "OBSERVER")
BOB = Identity("bob", "local", "OBSERVER")


class Loader:
    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def __call__(self, identity: Identity) -> str:
        self.calls += 1
        n = self.calls
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return f"{identity.user_id}-{n}"


async def test_concurrent_misses_share_one_load() -> None:
    load = Loader()
    load.gate.clear()
    cache = CreditCache(load, ttl=60, maxsize=10)
    waiters = [asyncio.ensure_future(cache.get(ANN)) for _ in range(100)]
    await asyncio.sleep(0)
    load.gate.set()
    assert set(await asyncio.gather(*waiters)) == {"ann-1"}
    assert load.calls == 1
    assert await cache.get(ANN) == "ann-1"
    assert load.calls == 1


async def test_a_failure_is_shared_and_not_cached() -> None:
    load = Loader()
    load.gate.clear()
    load.fail = RuntimeError("backend down")
    cache = CreditCache(load, ttl=60, maxsize=10)
    waiters = [asyncio.ensure_future(cache.get(ANN)) for _ in range(10)]
    await asyncio.sleep(0)
    load.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert load.calls == 1
    load.fail = None
    assert await cache.get(ANN) == "ann-2"


async def test_invalidation_during_a_load_leaves_no_stale_entry() -> None:
    load = Loader()
    load.gate.clear()
    cache = CreditCache(load, ttl=60, maxsize=10)
    before = asyncio.ensure_future(cache.get(ANN))
    await asyncio.sleep(0)
    cache.invalidate(ANN)  # e.g. a spend finished while the load was in flight
    after = asyncio.ensure_future(cache.get(ANN))
    await asyncio.sleep(0)
    load.gate.set()
    assert await before == "ann-1"
    assert await after == "ann-2"
    assert await cache.get(ANN) == "ann-2"  # kept: no third load
    assert load.calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_load_for_others() -> None:
    load = Loader()
    load.gate.clear()
    cache = CreditCache(load, ttl=60, maxsize=10)
    first = asyncio.ensure_future(cache.get(ANN))
    second = asyncio.ensure_future(cache.get(ANN))
    await asyncio.sleep(0)
    first.cancel()
    load.gate.set()
    assert await second == "ann-1"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_entries_expire_and_are_bounded() -> None:
    now = [0.0]
    load = Loader()
    cache = CreditCache(load, ttl=15, maxsize=1, timer=lambda: now[0])
    assert await cache.get(ANN) == "ann-1"
    now[0] = 14.9
    assert await cache.get(ANN) == "ann-1"
    now[0] = 15.1
    assert await cache.get(ANN) == "ann-2"
    await cache.get(BOB)
    assert len(cache) == 1
    calls = load.calls
    await cache.get(ANN)  # evicted by BOB: loaded again
    assert load.calls == calls + 1


async def test_aclose_cancels_running_loads() -> None:
    load = Loader()
    load.gate.clear()
    cache = CreditCache(load, ttl=60, maxsize=10)
    waiter = asyncio.ensure_future(cache.get(ANN))
    await asyncio.sleep(0)
    await cache.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_values_may_choose_a_shorter_lifetime() -> None:
    now = [0.0]
    answers = {"ann": "no-credit", "bob": "credit"}

    loads: list[str] = []

    async def load(identity: Identity) -> str:
        loads.append(identity.user_id)
        return answers[identity.user_id]

    cache: CreditCache[str] = CreditCache(
        load, ttl=15, maxsize=10, timer=lambda: now[0], ttl_of=lambda v: 15 if v == "credit" else 5
    )
    await cache.get(ANN)
    await cache.get(BOB)
    now[0] = 6
    await cache.get(ANN)
    await cache.get(BOB)
    assert loads == ["ann", "bob", "ann"]  # "no credit" expired after 5 s, "credit" did not
