"""How many tokens one user may be given (by login or refresh) within a window.

Every logout and refresh revokes a token, and a revocation is kept until its token expires (it is
never dropped early: that would let the token back in). What bounds that memory is how many tokens
a user can get: at most `max_per_user` per `window_seconds` each, so revocations kept are at most
users x limit x (token life / window). Beyond the limit, login and refresh answer 429 with
`Retry-After`; the tokens the user holds stay valid.

Counted in this process's memory: with several processes each counts its own (the bound is then
per process). A fixed window per user opens with their first token; the counters are bounded
(`MAX_USERS`, least recently used first), so churning them out needs that many accounts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from cachetools import TTLCache

from .config import BillingConfig

#: Users whose counts are kept at once.
MAX_USERS: Final = 100_000
TOO_MANY_TOKENS: Final = "Too many new tokens for this user; try again later"

UserKey = tuple[str, str]


class _Window:
    __slots__ = ("count", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0


class TokenIssueLimit:
    """`take(user)` before issuing a token: None when it may be issued (and it is counted), else the
    seconds until the user's window closes. A limit of 0 counts nothing."""

    def __init__(
        self,
        max_per_user: int,
        window_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_users: int = MAX_USERS,
    ) -> None:
        self._limit = max_per_user
        self._window = window_seconds
        self._clock = clock
        # An entry's TTL runs from its creation, the window's first token; counts change in place.
        self._users: TTLCache[UserKey, _Window] = TTLCache(max_users, window_seconds, timer=clock)

    @classmethod
    def from_config(cls, config: BillingConfig) -> TokenIssueLimit:
        return cls(config.token_issue_max_per_user, config.token_issue_window_seconds)

    def take(self, user: UserKey) -> float | None:
        if not self._limit:
            return None
        now = self._clock()
        window = self._users.get(user)
        if window is None:
            window = self._users[user] = _Window(now)
        if window.count >= self._limit:
            return max(window.start + self._window - now, 0.0)
        window.count += 1
        return None
