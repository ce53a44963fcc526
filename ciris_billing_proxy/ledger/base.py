"""The ledger's interface: what every engine's implementation promises.

Every write is one transaction that first locks the account (SQLite: `BEGIN IMMEDIATE`;
PostgreSQL: the account's row, created or locked in one statement), so concurrent writes of one
account, from any number of processes, each see what the one before left: a spend never takes more
than the balance, and the events a write causes are decided from the exact balance before and
after it, inside that transaction, and written to the event outbox (`store.events`) in it too.
Idempotency keys are per account: a spend, reservation, grant or claw-back repeated with its key
changes nothing and answers as the first did (a spend answers the balance as it is now).
"""

from __future__ import annotations

import abc
import functools
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import ClassVar, Final

from ..store.engine import Engine, Migrated, RecordStore, Schema
from .model import (
    Account,
    Balance,
    ClawedBack,
    Entry,
    Grant,
    Granted,
    Usage,
    UsageTotal,
)

#: The clock a ledger reads (Unix seconds); a test passes its own.
Clock = Callable[[], float]


def no_signup(_product: str) -> int:
    return 0


class Overdrawn(Exception):
    """A claw-back larger than the account's balance, refused (`partial=False`): nothing changed."""

    def __init__(self, balance: int) -> None:
        super().__init__(f"the balance is {balance}")
        self.balance = balance


class KeyReused(ValueError):
    """A grant's idempotency key already used by a claw-back of the account, or the other way
    round: nothing changed."""


def check_replay(
    grant: Grant, key: str, amount: int, kind: str, source: str, reason: str, expires_at: int | None
) -> None:
    """A grant's key used again must ask for the same grant (then the first is answered);
    `KeyReused` when it asks for another (a client that reuses a key for a different change must
    hear so, not get the earlier one back as if it were what it asked for)."""
    asked = (amount, kind, source, reason, expires_at)
    if asked != (grant.amount, grant.kind, grant.source, grant.reason, grant.expires_at):
        raise KeyReused(key)


class NoReservation(LookupError):
    """`settle` under a key that reserved nothing."""


#: What `Ledger.journal` returns per page at most.
MAX_PAGE: Final = 100


def iso(at: float) -> str:
    """Timestamps of the ledger's rows: fixed width, so they compare as strings. The text of
    `datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds")`, its microseconds rounded
    as that rounds them (half to even), with the date and time to the second made once per second:
    every spend writes one, and `isoformat` cost about 13,000 instructions."""
    fraction, whole = math.modf(at)
    micro = round(fraction * 1_000_000)
    if micro >= 1_000_000:
        micro -= 1_000_000
        whole += 1
    elif micro < 0:
        micro += 1_000_000
        whole -= 1
    return f"{_second_of(int(whole))}.{micro:06d}+00:00"


@functools.lru_cache(maxsize=2)
def _second_of(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class Ledger(RecordStore, abc.ABC):
    """Grants, spends, reservations, expiry and usage of accounts (`model.Account`).

    * `clock`: what "now" is (Unix seconds), for expiry and timestamps.
    * `low_balance_threshold`: a spend that takes an account's balance from above it to at or below
      it writes one `balance.low` event.
    * `signup`: free uses every account of a product ("" for interactions) gets, made a `free`
      grant (source `signup`) on the account's first write; until then its balance shows them
      (less any uses spent before grants existed). 0: none.

    `open` migrates the ledger's schema and the event outbox's on its engine.
    """

    event_schema: ClassVar[Schema]

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock = time.time,
        low_balance_threshold: int | None = None,
        signup: Callable[[str], int] = no_signup,
    ) -> None:
        super().__init__(engine)
        self.clock = clock
        self.low_balance_threshold = low_balance_threshold
        self.signup = signup

    async def open(self) -> Migrated:
        migrated = await super().open()
        await self.engine.migrate(self.event_schema)
        return migrated

    # -- reads -----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def balance(self, account: Account) -> Balance:
        """The account's balance as of now (expired grants excluded, to the second)."""

    @abc.abstractmethod
    async def grants(self, account: Account) -> list[Grant]:
        """Every grant of the account, newest first (spent and expired ones included)."""

    @abc.abstractmethod
    async def entries(self, account: Account, limit: int, offset: int) -> tuple[list[Entry], int]:
        """The account's journal, newest first, and how many lines it has."""

    @abc.abstractmethod
    async def journal(
        self,
        *,
        namespace: str | None = None,
        user_id: str | None = None,
        since: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Entry], int]:
        """Journal lines of every account (or one user's), newest first, from `since` (ISO 8601,
        UTC, as `iso` writes it) on, of one `kind`; and how many match."""

    @abc.abstractmethod
    async def usage_totals(
        self, namespace: str, user_id: str, since: str, until: str, group_by: str
    ) -> list[UsageTotal]:
        """Spends (settled reservations included, given-back ones not) of the user, every product,
        made in [`since`, `until`), totalled per `day`, `model` or `product`, in key order."""

    # -- writes ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def grant(
        self,
        account: Account,
        amount: int,
        kind: str,
        *,
        source: str,
        reason: str,
        note: str | None = None,
        actor: str | None = None,
        expires_at: int | None = None,
        key: str | None = None,
    ) -> Granted:
        """Add credit (`amount` > 0); `credit.granted`. A key used before answers that grant."""

    @abc.abstractmethod
    async def claw_back(
        self,
        account: Account,
        amount: int,
        *,
        reason: str,
        note: str | None = None,
        actor: str | None = None,
        kind: str | None = None,
        grant_id: int | None = None,
        key: str | None = None,
        partial: bool = False,
    ) -> ClawedBack:
        """Take credit back (`amount` > 0): from `grant_id` first when given, then from live grants
        (of `kind` only, when given) in reverse spending order (what would be spent last goes
        first); `credit.clawed_back`. More than there is: `Overdrawn` (nothing taken), or with
        `partial` what there is (`ClawedBack.taken` says how much)."""

    @abc.abstractmethod
    async def spend(
        self, account: Account, key: str, cost: int = 1, usage: Usage | None = None
    ) -> Balance | None:
        """Take `cost` (>= 1) in spending order, all or nothing: the balance after, or None when
        there is not enough (nothing taken)."""

    @abc.abstractmethod
    async def reserve(self, account: Account, key: str, amount: int) -> Balance | None:
        """Take `amount` (>= 1) as `spend` does, to be settled (`settle`) or given back."""

    @abc.abstractmethod
    async def settle(self, account: Account, key: str, cost: int, usage: Usage | None = None) -> Balance:
        """Keep `cost` of the reservation under `key` (at most what it reserved) and give the rest
        back to its grants; `NoReservation` when the key reserved nothing. Settling again, or after
        a give-back, changes nothing."""

    @abc.abstractmethod
    async def give_back(self, account: Account, key: str) -> Balance | None:
        """Return what the spend or reservation under `key` took to the grants it came from (to an
        expired grant too: that credit stays expired); once. None when the key took nothing."""

    @abc.abstractmethod
    async def attach_usage(self, account: Account, key: str, usage: Usage) -> None:
        """Record what the spend under `key` was for (after the handler ran)."""

    @abc.abstractmethod
    async def expire_due(self) -> int:
        """Announce every grant whose expiry has come and that still held credit: one
        `credit.expired` event and journal line per grant, once (even with several processes
        sweeping at once). How many it announced."""


def event_data(account: Account, **fields: object) -> dict[str, object]:
    return {"namespace": account.namespace, "user_id": account.user_id, **fields}


def grant_data(grant: Grant, balance: Balance) -> dict[str, object]:
    return {
        "grant_id": grant.id,
        "kind": grant.kind,
        "amount": grant.amount,
        "source": grant.source,
        "reason": grant.reason,
        "expires_at": grant.expires_at,
        "balance_after": balance.total,
    }
