"""The in-memory login throttle, the client address it counts under, and their settings.

The login route's use of them is tested over HTTP in test_login_throttle.py."""

from __future__ import annotations

from ipaddress import ip_network

import pytest
from aiohttp.test_utils import make_mocked_request

from ciris_billing_proxy import BillingConfig, ConfigError
from ciris_billing_proxy.client_address import client_address
from ciris_billing_proxy.throttle import LoginAttempt, MemoryLoginThrottle

from .conftest import SECRET
from .default_paths import LOGIN


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, *, user: int = 2, address: int = 0, max_keys: int = 100) -> MemoryLoginThrottle:
    return MemoryLoginThrottle(
        max_failures_per_user=user,
        max_failures_per_address=address,
        window_seconds=60,
        clock=clock,
        max_keys=max_keys,
    )


async def test_admit_counts_and_locks_until_the_window_closes() -> None:
    clock = Clock()
    limiter = throttle(clock)
    ann = LoginAttempt("ann", "192.0.2.1")
    assert await limiter.admit(ann) is None
    clock.now += 10
    assert await limiter.admit(ann) is None
    assert await limiter.admit(ann) == 50  # the window opened at the first failure
    clock.now += 49.5
    assert await limiter.admit(ann) == 0.5
    clock.now += 0.5
    assert await limiter.admit(ann) is None


async def test_memory_is_bounded_by_dropping_the_least_recently_used() -> None:
    clock = Clock()
    limiter = throttle(clock, user=1, max_keys=3)
    assert await limiter.admit(LoginAttempt("ann", "a")) is None
    assert await limiter.admit(LoginAttempt("ann", "a")) is not None
    for name in ("u1", "u2", "u3"):  # a spray of usernames pushes the oldest counter out
        await limiter.admit(LoginAttempt(name, "a"))
    assert await limiter.admit(LoginAttempt("ann", "a")) is None
    assert await limiter.admit(LoginAttempt("u3", "a")) is not None


async def test_expired_counters_go_first() -> None:
    clock = Clock()
    limiter = throttle(clock, user=1, max_keys=2)
    await limiter.admit(LoginAttempt("old", "a"))
    clock.now += 30
    await limiter.admit(LoginAttempt("ann", "a"))
    clock.now += 20
    assert await limiter.admit(LoginAttempt("old", "a")) == 10  # now the most recently used
    clock.now += 10  # "old" has expired; "ann" has 30 s left
    await limiter.admit(LoginAttempt("new", "a"))
    assert await limiter.admit(LoginAttempt("ann", "a")) == 30


async def test_success_clears_the_user_and_takes_back_the_address_count() -> None:
    limiter = throttle(Clock(), user=3, address=2)
    ann, bob = LoginAttempt("ann", "a"), LoginAttempt("bob", "a")
    assert await limiter.admit(ann) is None
    assert await limiter.admit(ann) is None
    await limiter.succeeded(ann)
    assert await limiter.admit(bob) is None
    assert await limiter.admit(bob) is not None  # the address: one failure (ann's first) + bob's


class _Transport:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self._peer, 1234) if name == "peername" else default


def request(peer: str, *forwarded: str) -> object:
    headers = [("X-Forwarded-For", value) for value in forwarded]
    return make_mocked_request("POST", LOGIN, headers=headers, transport=_Transport(peer))


TRUSTED = (ip_network("10.0.0.0/8"), ip_network("2001:db8:ffff::/48"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("192.0.2.1", ("203.0.113.9",), (), "192.0.2.1"),  # not trusted: the header is ignored
        ("192.0.2.1", ("203.0.113.9",), TRUSTED, "192.0.2.1"),  # the peer is no trusted proxy
        ("10.0.0.1", ("203.0.113.9",), TRUSTED, "203.0.113.9"),
        ("10.0.0.1", ("1.1.1.1, 203.0.113.9",), TRUSTED, "203.0.113.9"),
        ("10.0.0.1", ("1.1.1.1", "203.0.113.9, 10.0.0.2"), TRUSTED, "203.0.113.9"),  # repeated headers
        ("10.0.0.1", ("203.0.113.9:4711",), TRUSTED, "203.0.113.9"),
        ("10.0.0.1", ("[2001:db8:1:2:3::4]:443",), TRUSTED, "2001:db8:1:2::/64"),
        ("10.0.0.1", ("10.0.0.7",), TRUSTED, "10.0.0.7"),  # all trusted: the farthest
        ("10.0.0.1", (), TRUSTED, "10.0.0.1"),
        ("10.0.0.1", ("unknown",), TRUSTED, "unknown"),
        ("2001:db8:1:2:aaaa::1", (), (), "2001:db8:1:2::/64"),  # IPv6: one /64 is one client
        ("::ffff:192.0.2.1", (), (), "192.0.2.1"),
    ],
)
def test_client_address(
    peer: str, forwarded: tuple[str, ...], trusted: tuple[object, ...], expected: str
) -> None:
    assert client_address(request(peer, *forwarded), trusted) == expected  # type: ignore[arg-type]


def test_settings_from_the_environment() -> None:
    config = BillingConfig.from_env(
        {
            "CIRIS_JWT_SECRET": SECRET,
            "CIRIS_LOGIN_MAX_FAILURES_PER_USER": "3",
            "CIRIS_LOGIN_MAX_FAILURES_PER_ADDRESS": "0",
            "CIRIS_LOGIN_FAILURE_WINDOW_SECONDS": "60",
            "CIRIS_TRUSTED_PROXIES": "10.0.0.0/8, ::1",
        }
    )
    assert (config.login_max_failures_per_user, config.login_max_failures_per_address) == (3, 0)
    assert config.login_failure_window_seconds == 60
    assert config.trusted_proxies == (ip_network("10.0.0.0/8"), ip_network("::1"))
    defaults = BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET})
    assert (defaults.login_max_failures_per_user, defaults.login_max_failures_per_address) == (5, 20)
    assert (defaults.login_failure_window_seconds, defaults.trusted_proxies) == (900, ())


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"CIRIS_TRUSTED_PROXIES": "proxy.internal"}, "does not appear to be an IPv4 or IPv6 network"),
        ({"CIRIS_TRUSTED_PROXIES": "10.0.0.1/8"}, "has host bits set"),
        ({"CIRIS_LOGIN_MAX_FAILURES_PER_USER": "-1"}, "login_max_failures_per_user"),
        ({"CIRIS_LOGIN_FAILURE_WINDOW_SECONDS": "0"}, "login_failure_window_seconds"),
    ],
)
def test_bad_settings_fail_at_startup(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET, **env})
