"""Start a coroutine on the caller's stack, and hand it to a task only if it has to wait.

A spend on SQLite usually runs on the event loop and finishes without waiting for anything (no
lock held elsewhere, no thread hand-off): started as a task, it would cost a task, a `shield` and
two turns of the loop around work that never yields (about a tenth of a gated interaction's
instructions, `bench.instructions`). Nothing can cancel a coroutine between two of its suspension
points, so running it here up to its first one is as safe as running it in a task; from that
point on it runs in the task `track` makes, as it always did.

Unlike Python 3.12's `eager_start` (this package supports 3.11), the first part runs as the
caller's task: a context entered there that binds to the running task (`asyncio.timeout`, an HTTP
client's timeout) would stay bound to the caller while the rest runs in another task, and its
timeout would cancel the caller; and a context variable set there stays set for the caller. Only
for coroutines that do neither before their first wait (the service asks the provider:
`CreditProvider.eager_spends`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def start_eagerly(
    coro: Coroutine[Any, Any, T], track: Callable[[Coroutine[Any, Any, T]], asyncio.Future[T]]
) -> asyncio.Future[T]:
    """`coro` run up to its first suspension now: a done future when it finished without one (its
    result or its exception), else `track` of the rest of it."""
    try:
        waits_on = coro.send(None)
    except StopIteration as done:
        finished: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        finished.set_result(done.value)
        return finished
    except Exception as exc:
        failed: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        failed.set_exception(exc)
        return failed
    rest = track(_rest(coro, waits_on))
    # A task cancelled before its first step never runs `_rest`: the started coroutine is closed
    # when the task ends, so that its `finally` clauses run (a no-op once it has finished).
    rest.add_done_callback(lambda _: coro.close())
    return rest


async def _rest(coro: Coroutine[Any, Any, T], waits_on: Any) -> T:
    return await _Rest(coro, waits_on)


class _Rest(Generic[T]):
    """An awaitable of the rest of a started coroutine (`await` takes any object with `__await__`)."""

    def __init__(self, coro: Coroutine[Any, Any, T], waits_on: Any) -> None:
        self.coro = coro
        self.waits_on = waits_on

    def __await__(self) -> Generator[Any, Any, T]:
        return _resume(self.coro, self.waits_on)


def _resume(coro: Coroutine[Any, Any, T], waits_on: Any) -> Generator[Any, Any, T]:
    """The rest of `coro`, which has already yielded `waits_on`: that is handed to the task first,
    then each value or exception the task sends is passed on, as `await` would."""
    while True:
        try:
            try:
                sent = yield waits_on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation, thrown in by the task
                waits_on = coro.throw(exc)
            else:
                waits_on = coro.send(sent)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
