"""The credit ledger: grants, spends, reservations, expiry and usage, shared by the providers that own
credit (`simple`; a `stripe` provider's purchases are `paid` grants on it). docs/credits.md tells
the rules; this is the API.

    ledger = ledger_for(engine, clock=time.time, low_balance_threshold=5, signup=lambda product: 10)
    await ledger.open()                                   # migrates the ledger's and the outbox's schema
    account = Account(namespace, user_id)                 # product="" : the interaction credits
    await ledger.grant(account, 100, "paid", source="purchase", reason="purchase", key=payment_id)
    await ledger.balance(account)                         # Balance(free, credits, used, soonest_expiry)
    await ledger.spend(account, request_key, cost=3)      # Balance after, or None: not enough
    await ledger.give_back(account, request_key)          # back to the grants it came from, once
    await ledger.reserve(account, request_key, 10)        # then settle(account, request_key, 4, usage)
    await ledger.grants(account)                          # newest first
    await ledger.claw_back(account, 5, reason="refund", grant_id=...)   # Overdrawn beyond the balance
    await ledger.expire_due()                             # announce expiries (credit.expired), once each
    await ledger.close()

Each engine has one implementation (`ledger_for` picks it): `SQLiteLedger`, `PostgresLedger`.
Every write is one transaction that locks the account first and writes the events it causes
(`balance.low`, `balance.exhausted`, `credit.granted`, `credit.clawed_back`, `credit.expired`) to
the outbox (`store.events`) in that transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..store.choose import for_engine
from ..store.engine import Engine
from .base import Clock, KeyReused, Ledger, NoReservation, Overdrawn, iso, no_signup
from .model import (
    ENTRY_KINDS,
    GRANT_KINDS,
    GRANT_SOURCES,
    REASONS,
    Account,
    Balance,
    ClawedBack,
    Entry,
    Grant,
    Granted,
    Usage,
    UsageTotal,
)
from .postgres import PostgresLedger
from .sqlite import SQLiteLedger


def ledger_for(
    engine: Engine,
    *,
    clock: Clock = time.time,
    low_balance_threshold: int | None = None,
    signup: Callable[[str], int] = no_signup,
) -> Ledger:
    """The ledger on `engine` (not yet opened): see `Ledger` for the options."""

    def make(cls: type[Ledger]) -> Callable[[Engine], Ledger]:
        return lambda e: cls(e, clock=clock, low_balance_threshold=low_balance_threshold, signup=signup)

    return for_engine(engine, "credit ledger", sqlite=make(SQLiteLedger), postgres=make(PostgresLedger))


__all__ = [
    "ENTRY_KINDS",
    "GRANT_KINDS",
    "GRANT_SOURCES",
    "REASONS",
    "Account",
    "Balance",
    "ClawedBack",
    "Clock",
    "Entry",
    "Grant",
    "Granted",
    "KeyReused",
    "Ledger",
    "NoReservation",
    "Overdrawn",
    "PostgresLedger",
    "SQLiteLedger",
    "Usage",
    "UsageTotal",
    "iso",
    "ledger_for",
]
