"""Login throttling over real HTTP: per username, per client address, behind trusted proxies."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciris_billing_proxy import AuthenticatedUser
from ciris_billing_proxy.throttle import MemoryLoginThrottle

from .conftest import ClientFactory, CountingAuthenticator, make_config
from .default_paths import LOGIN

LOCKED = {"detail": "Too many login attempts"}

Client = TestClient[web.Request, web.Application]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def users() -> CountingAuthenticator:
    return CountingAuthenticator()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def serve(make_client: ClientFactory, tmp_path: Path, users: CountingAuthenticator, clock: Clock) -> Any:
    async def factory(**overrides: Any) -> Client:
        config = make_config(tmp_path, **overrides)
        throttle = MemoryLoginThrottle.from_config(config, clock=clock)
        return await make_client(config, authenticate=users, login_throttle=throttle)

    return factory


async def login(client: Client, username: str, password: str, **headers: str) -> Any:
    return await client.post(LOGIN, json={"username": username, "password": password}, headers=headers)


async def statuses(client: Client, username: str, password: str, times: int, **headers: str) -> list[int]:
    return [(await login(client, username, password, **headers)).status for _ in range(times)]


async def test_five_failures_lock_the_username_even_for_the_right_password(
    serve: Any, users: CountingAuthenticator
) -> None:
    client = await serve()
    assert await statuses(client, "ann", "wrong", 5) == [401] * 5
    resp = await login(client, "ann", "correct horse")
    assert resp.status == 429
    assert await resp.json() == LOCKED
    assert resp.headers["Retry-After"] == "900"
    assert resp.content_type == "application/json"
    assert users.calls == 5  # the locked attempt checked no password
    assert (await login(client, "bob", "battery staple")).status == 200  # others are not affected


async def test_unknown_usernames_are_counted_and_locked_the_same_way(
    serve: Any, users: CountingAuthenticator
) -> None:
    client = await serve()
    assert await statuses(client, "nobody", "guess", 5) == [401] * 5
    resp = await login(client, "nobody", "guess")
    assert (resp.status, await resp.json(), resp.headers["Retry-After"]) == (429, LOCKED, "900")
    assert users.calls == 5


async def test_usernames_are_counted_case_insensitively(serve: Any) -> None:
    client = await serve()
    for name in ("ann", "ANN", "Ann", "aNn", "\uff41\uff4e\uff4e"):  # the last: full-width letters
        assert (await login(client, name, "wrong")).status == 401
    assert (await login(client, "ann", "correct horse")).status == 429


async def test_a_success_resets_the_username_count(serve: Any) -> None:
    client = await serve()
    assert await statuses(client, "ann", "wrong", 4) == [401] * 4
    assert (await login(client, "ann", "correct horse")).status == 200
    assert await statuses(client, "ann", "wrong", 5) == [401] * 5
    assert (await login(client, "ann", "correct horse")).status == 429


async def test_the_lock_ends_with_the_window(serve: Any, clock: Clock) -> None:
    client = await serve()
    assert await statuses(client, "ann", "wrong", 5) == [401] * 5
    clock.now += 899.5
    resp = await login(client, "ann", "correct horse")
    assert (resp.status, resp.headers["Retry-After"]) == (429, "1")
    clock.now += 0.5
    assert (await login(client, "ann", "correct horse")).status == 200


async def test_the_window_opens_with_the_first_failure(serve: Any, clock: Clock) -> None:
    client = await serve()
    assert await statuses(client, "ann", "wrong", 4) == [401] * 4
    clock.now += 600
    assert (await login(client, "ann", "wrong")).status == 401
    resp = await login(client, "ann", "correct horse")
    assert (resp.status, resp.headers["Retry-After"]) == (429, "300")
    clock.now += 300
    # The window closed, and its failures with it: a new window starts from nothing.
    assert await statuses(client, "ann", "wrong", 4) == [401] * 4
    assert (await login(client, "ann", "correct horse")).status == 200


async def test_failures_are_counted_per_address(serve: Any, users: CountingAuthenticator) -> None:
    client = await serve(login_max_failures_per_address=3)
    for name in ("ann", "bob", "carol"):
        assert (await login(client, name, "wrong")).status == 401
    resp = await login(client, "bob", "battery staple")
    assert (resp.status, await resp.json()) == (429, LOCKED)
    assert users.calls == 3


async def test_a_success_takes_back_its_address_count(serve: Any) -> None:
    client = await serve(login_max_failures_per_address=3)
    assert await statuses(client, "bob", "battery staple", 10) == [200] * 10
    assert await statuses(client, "ann", "wrong", 3) == [401] * 3
    assert (await login(client, "bob", "battery staple")).status == 429


async def test_a_refused_attempt_is_not_counted(serve: Any) -> None:
    client = await serve(login_max_failures_per_user=2, login_max_failures_per_address=3)
    assert await statuses(client, "ann", "wrong", 2) == [401, 401]  # ann locked; address at 2
    assert await statuses(client, "ann", "wrong", 10) == [429] * 10  # would lock the address if counted
    assert (await login(client, "bob", "wrong")).status == 401  # the address's third failure
    assert (await login(client, "bob", "battery staple")).status == 429


async def test_zero_disables_throttling(serve: Any, users: CountingAuthenticator) -> None:
    client = await serve(login_max_failures_per_user=0, login_max_failures_per_address=0)
    assert await statuses(client, "ann", "wrong", 30) == [401] * 30
    assert (await login(client, "ann", "correct horse")).status == 200
    assert users.calls == 31


async def test_concurrent_guesses_cannot_outrun_the_count(make_client: ClientFactory, tmp_path: Path) -> None:
    """Each admitted attempt is counted before its password is checked, so a burst of guesses gets
    exactly as many checks as the limit allows, however they interleave."""
    calls = 0
    release = asyncio.Event()
    progress = asyncio.Event()

    async def slow(username: str, password: str) -> AuthenticatedUser | None:
        nonlocal calls
        calls += 1
        progress.set()
        await release.wait()
        return None

    client = await make_client(make_config(tmp_path), authenticate=slow)
    burst = [asyncio.create_task(login(client, "ann", f"guess-{i}")) for i in range(20)]
    for task in burst:
        task.add_done_callback(lambda _: progress.set())
    # Hold every checked password until each guess has been either checked or answered.
    while calls + sum(task.done() for task in burst) < len(burst):
        progress.clear()
        await progress.wait()
    release.set()
    replies = await asyncio.gather(*burst)
    assert sorted(r.status for r in replies) == [401] * 5 + [429] * 15
    assert calls == 5


async def test_a_failing_authenticator_still_counts(make_client: ClientFactory, tmp_path: Path) -> None:
    async def broken(username: str, password: str) -> AuthenticatedUser | None:
        raise RuntimeError("database down")

    client = await make_client(make_config(tmp_path), authenticate=broken)
    assert await statuses(client, "ann", "pw", 5) == [500] * 5
    assert (await login(client, "ann", "pw")).status == 429


async def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(serve: Any) -> None:
    client = await serve(login_max_failures_per_user=0, login_max_failures_per_address=2)
    first = await login(client, "ann", "wrong", **{"X-Forwarded-For": "203.0.113.1"})
    second = await login(client, "ann", "wrong", **{"X-Forwarded-For": "203.0.113.2"})
    assert (first.status, second.status) == (401, 401)
    third = await login(client, "bob", "battery staple", **{"X-Forwarded-For": "203.0.113.3"})
    assert third.status == 429  # all three came from 127.0.0.1, whatever they claimed


async def test_a_trusted_proxy_forwards_the_client_address(serve: Any) -> None:
    client = await serve(
        login_max_failures_per_user=0, login_max_failures_per_address=2, trusted_proxies=["127.0.0.0/8"]
    )
    alice = {"X-Forwarded-For": "203.0.113.1"}
    assert await statuses(client, "ann", "wrong", 2, **alice) == [401, 401]
    assert (await login(client, "bob", "battery staple", **alice)).status == 429
    # Another client behind the same proxy is not affected.
    assert (await login(client, "bob", "battery staple", **{"X-Forwarded-For": "203.0.113.2"})).status == 200
    # What the client wrote itself is left of the address the proxy appended, and not believed.
    spoofed = {"X-Forwarded-For": "198.51.100.7, 203.0.113.1"}
    assert (await login(client, "bob", "battery staple", **spoofed)).status == 429
    # A chain of trusted proxies: the right-most untrusted entry is the client.
    chained = {"X-Forwarded-For": "203.0.113.1, 127.0.0.5"}
    assert (await login(client, "bob", "battery staple", **chained)).status == 429


async def test_throttled_logins_of_two_apps_are_separate(
    make_client: ClientFactory, tmp_path: Path, users: CountingAuthenticator
) -> None:
    config = make_config(tmp_path)
    first = await make_client(config, authenticate=users)
    second = await make_client(config, authenticate=users)
    assert await statuses(first, "ann", "wrong", 5) == [401] * 5
    assert (await login(first, "ann", "correct horse")).status == 429
    assert (await login(second, "ann", "correct horse")).status == 200
