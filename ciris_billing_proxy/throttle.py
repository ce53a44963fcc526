"""Login throttling: failed logins counted per username and per client address, within a window.

The login route asks `admit` before it checks a password. An admitted attempt is counted as a
failure at once, so that concurrent guesses cannot all slip in before the first failure is
recorded; `succeeded` then takes that back (and clears the username's count). A refused attempt
(the route's 429) is not counted.

`MemoryLoginThrottle` counts within one process; `StoreLoginThrottle` in the database named by
`database_url`, shared by every process on it (`setup_billing` uses it whenever that is set). A
database outage fails closed: the login route answers 503 and checks no password.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from hashlib import blake2b
from typing import Final, Protocol, TypeVar

from aiohttp import web
from cachetools import TTLCache

from .config import BillingConfig, ConfigError
from .database_url import parse_database_url
from .store.choose import engine_for
from .store.login_failures import Counter, LoginFailures, login_failures
from .store.sweeper import Sweeper

#: Counters kept per kind (usernames, addresses). The least recently used goes first when full;
#: filling it needs that many failed logins within one window, each paying for a password check.
DEFAULT_MAX_KEYS: Final = 50_000

K = TypeVar("K", bytes, str)


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """Who is trying: the username as submitted and the client address key (see `client_address`)."""

    username: str
    address: str


class LoginThrottle(Protocol):
    """What the login route needs from a throttle. Implementations shared by several processes
    (a database) must make `admit` atomic: the check and the count are one step."""

    async def admit(self, attempt: LoginAttempt) -> float | None:
        """None, with the attempt now counted as a failure; or the seconds until a locked username
        or address may try again, counting nothing."""

    async def succeeded(self, attempt: LoginAttempt) -> None:
        """The admitted attempt had the right password: clear the username's failures and take back
        the address's count of this attempt."""


class _Window:
    """Failures since `start`; the entry expires (and the count with it) at `start` + the window."""

    __slots__ = ("count", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0


class MemoryLoginThrottle:
    """The counters of one process, in bounded memory.

    Each key has a fixed window that opens with its first failure: `max_failures` failures within
    `window_seconds` lock it until the window closes. A limit of 0 disables that kind of counting.
    Usernames are counted case-insensitively (Unicode NFKC, then case-folded), so an authenticator
    that ignores case cannot be sprayed with case variants, and by a 128-bit digest, so a long
    username costs no more memory than a short one.
    """

    def __init__(
        self,
        *,
        max_failures_per_user: int,
        max_failures_per_address: int,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._window = window_seconds
        self._clock = clock
        self._user_limit = max_failures_per_user
        self._address_limit = max_failures_per_address
        # An entry's TTL runs from its creation, i.e. from the window's first failure; counts are
        # changed in place, which leaves the expiry where it is.
        self._users: TTLCache[bytes, _Window] = TTLCache(max_keys, window_seconds, timer=clock)
        self._addresses: TTLCache[str, _Window] = TTLCache(max_keys, window_seconds, timer=clock)

    @classmethod
    def from_config(
        cls, config: BillingConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> MemoryLoginThrottle:
        return cls(
            max_failures_per_user=config.login_max_failures_per_user,
            max_failures_per_address=config.login_max_failures_per_address,
            window_seconds=config.login_failure_window_seconds,
            clock=clock,
        )

    async def admit(self, attempt: LoginAttempt) -> float | None:
        # No await from here to the end: the check and the count are one step for this process.
        now = self._clock()
        user_key = _username_key(attempt.username)
        user = self._users.get(user_key) if self._user_limit else None
        address = self._addresses.get(attempt.address) if self._address_limit else None
        wait = max(
            self._locked_for(user, self._user_limit, now),
            self._locked_for(address, self._address_limit, now),
        )
        if wait > 0:
            return wait
        if self._user_limit:
            _count(self._users, user_key, user, now)
        if self._address_limit:
            _count(self._addresses, attempt.address, address, now)
        return None

    async def succeeded(self, attempt: LoginAttempt) -> None:
        self._users.pop(_username_key(attempt.username), None)
        address = self._addresses.get(attempt.address)
        if address is not None and address.count > 0:
            address.count -= 1

    def _locked_for(self, window: _Window | None, limit: int, now: float) -> float:
        if window is None or window.count < limit:
            return 0.0
        # The cache returns only live entries, so this is positive; the floor guards against rounding.
        return max(window.start + self._window - now, 1e-3)


def _count(table: TTLCache[K, _Window], key: K, window: _Window | None, now: float) -> None:
    if window is None:
        window = table[key] = _Window(now)
    window.count += 1


def fold_username(username: str) -> str:
    """The form usernames are counted under: Unicode NFKC, then case-folded ("Bob" and "BOB" are
    "bob"). `users.UserStore` refuses two names with the same form for the same reason."""
    return unicodedata.normalize("NFKC", username).casefold()


def _username_key(username: str) -> bytes:
    return blake2b(fold_username(username).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class StoreLoginThrottle:
    """The counters in a database, so N processes on it never let more failures through than the
    limits (each `admit` is one atomic step there). Same rules as `MemoryLoginThrottle`, on the
    database's clock; opened and closed by `lifespan`, an `app.cleanup_ctx` entry."""

    def __init__(
        self,
        failures: LoginFailures,
        *,
        max_failures_per_user: int,
        max_failures_per_address: int,
        window_seconds: float,
    ) -> None:
        self.failures = failures
        self._user_limit = max_failures_per_user
        self._address_limit = max_failures_per_address
        self._window = window_seconds
        self._sweeper = Sweeper(failures.sweep, "login failure counters")

    @classmethod
    def from_config(cls, config: BillingConfig) -> StoreLoginThrottle:
        """On the database of `config.database_url`, which must be set."""
        if config.database_url is None:
            raise ConfigError("a login throttle in the store needs database_url")
        engine = engine_for(
            parse_database_url(config.database_url.get_secret_value()), config.database_budget
        )
        return cls(
            login_failures(engine),
            max_failures_per_user=config.login_max_failures_per_user,
            max_failures_per_address=config.login_max_failures_per_address,
            window_seconds=config.login_failure_window_seconds,
        )

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        try:
            await self.failures.open()
            self._sweeper.start()
            yield
        finally:
            await self._sweeper.aclose()
            await self.failures.close()

    async def admit(self, attempt: LoginAttempt) -> float | None:
        user, address = self._counters(attempt)
        counters = tuple(c for c in (user, address) if c.limit)
        return await self.failures.admit(counters, self._window)

    async def succeeded(self, attempt: LoginAttempt) -> None:
        await self.failures.succeeded(*self._counters(attempt))

    def _counters(self, attempt: LoginAttempt) -> tuple[Counter, Counter]:
        return (
            Counter("user", _username_key(attempt.username).hex(), self._user_limit),
            Counter("address", attempt.address, self._address_limit),
        )
