"""`eager.start_eagerly`: a coroutine run up to its first suspension on the caller's stack."""

from __future__ import annotations

import asyncio

import pytest

from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.eager import start_eagerly
from ciris_billing_proxy.identity import Identity
from ciris_billing_proxy.models import CreditStatus
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store import PostgresDatabase


async def test_one_that_never_waits_is_done_without_a_task() -> None:
    async def quick() -> int:
        return 5

    def never(_coro: object) -> asyncio.Task[int]:
        raise AssertionError("handed to a task")

    done = start_eagerly(quick(), never)
    assert done.done()
    assert done.result() == 5


async def test_a_failure_before_waiting_is_the_future_s() -> None:
    async def fails() -> int:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await start_eagerly(fails(), asyncio.ensure_future)


async def test_one_that_waits_goes_on_in_the_task_it_is_handed_to() -> None:
    steps: list[str] = []

    async def slow() -> int:
        steps.append("started")
        await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        steps.append("finished")
        return 7

    tasks: list[asyncio.Task[int]] = []

    def track(coro: object) -> asyncio.Task[int]:
        tasks.append(asyncio.ensure_future(coro))  # type: ignore[arg-type]
        return tasks[-1]

    rest = start_eagerly(slow(), track)
    assert steps == ["started"]
    assert rest is tasks[0]
    assert not rest.done()
    assert await rest == 7
    assert steps == ["started", "finished"]


async def test_a_cancellation_reaches_the_coroutine_where_it_waits() -> None:
    async def waits() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "caught"
        return "not cancelled"

    rest = start_eagerly(waits(), asyncio.ensure_future)
    await asyncio.sleep(0)
    rest.cancel()
    assert await rest == "caught"


async def test_one_cancelled_before_its_task_starts_is_closed() -> None:
    """The task is cancelled before its first step, so the rest of the coroutine never runs in it:
    the coroutine is closed, and its `finally` clauses run."""
    steps: list[str] = []

    async def waits() -> None:
        try:
            steps.append("started")
            await asyncio.sleep(10)
        finally:
            steps.append("cleaned up")

    rest = start_eagerly(waits(), asyncio.ensure_future)
    rest.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rest
    assert steps == ["started", "cleaned up"]


def test_only_a_simple_provider_on_sqlite_spends_eagerly() -> None:
    # PostgreSQL's pool is used within `asyncio.timeout`, which binds to the task it is entered in.
    assert SimpleProvider(database=":memory:").eager_spends
    postgres = PostgresDatabase(parse_database_url("postgresql://localhost/ciris"))
    assert not SimpleProvider(database=postgres).eager_spends


def test_a_subclass_that_spends_its_own_way_must_say_it_may_spend_eagerly() -> None:
    class Timed(SimpleProvider):
        async def spend(self, identity: Identity, idempotency_key: str) -> CreditStatus:
            async with asyncio.timeout(5):
                return await super().spend(identity, idempotency_key)

    class Labelled(SimpleProvider):
        name = "labelled"

    assert not Timed(database=":memory:").eager_spends
    assert Labelled(database=":memory:").eager_spends
