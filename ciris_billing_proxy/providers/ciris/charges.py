"""Which pool a charge took, decided exactly from the backend's transaction listing.

The charge reply does not say whether it took a free use or a paid credit, only the paid balance
after it (docs/billing-backend.md 3.2). Comparing that with a balance read at another moment races with
every other charge and refund of the same user. The listing (3.9) orders every charge and credit of
an account, newest first, each with its `balance_after`: a charge took a paid credit exactly when
its `balance_after` is below that of the entry just before it. That holds under any interleaving,
whichever process made the other entries, so this is the only rule used to decide a refund.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from cachetools import LRUCache

from ...errors import InsufficientCredit, ProviderUnavailable
from ...identity import Identity
from .backend import BillingBackend

logger = logging.getLogger("ciris_billing_proxy.ciris")

NO_CREDIT: Final = "No free uses or credits remaining"

#: One page of the listing: `(limit, offset) -> body` as the backend answers it.
FetchPage = Callable[[int, int], Awaitable[dict[str, Any]]]

PAGE_SIZE: Final = 100
#: How deep a charge is looked for. It is searched for just after it was made, so it is among the
#: newest entries unless thousands of others of the same user landed meanwhile.
MAX_PAGES: Final = 50


@dataclass(slots=True)
class ChargeRecord:
    """A charge this process sent. `charge_id` is known once the backend confirmed it (201, or a
    409 naming the existing charge); it stays None after a timeout, when the charge may or may not
    have landed. `sent_at` is monotonic time, to bound how long an unconfirmed charge is awaited."""

    sent_at: float
    charge_id: str | None = None


@dataclass(frozen=True, slots=True)
class ListedCharge:
    charge_id: str
    paid: bool


class ListingUnusable(Exception):
    """The listing did not answer in the contract's shape, so nothing can be decided from it."""


async def find_charge(
    fetch: FetchPage, matches: Callable[[dict[str, Any]], bool], *, max_pages: int = MAX_PAGES
) -> ListedCharge | None:
    """The first charge (newest first) that `matches`, and whether it took a paid credit; None when
    the account has no such charge within `max_pages` pages.

    Pages are read by offset while other entries may land at the top, which only shifts older
    entries down: a later page can repeat entries already seen (they are skipped by id) but never
    skip one, so the entry found after the charge is the one just before it in time.
    """
    seen: set[str] = set()
    charge: dict[str, Any] | None = None
    offset = 0
    for _ in range(max_pages):
        page = await fetch(PAGE_SIZE, offset)
        items = page.get("transactions")
        if not isinstance(items, list):
            raise ListingUnusable("no transactions list")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("transaction_id"), str):
                raise ListingUnusable("an entry without a transaction id")
            if item["transaction_id"] in seen:
                continue
            seen.add(item["transaction_id"])
            if charge is not None:
                return _decide(charge, _balance(item))
            if item.get("type") == "charge" and matches(item):
                charge = item
        if not items or page.get("has_more") is not True:
            # The charge is the account's first entry: accounts start with no paid credits.
            return None if charge is None else _decide(charge, 0)
        offset += len(items)
    return None


def _balance(item: dict[str, Any]) -> int:
    balance = item.get("balance_after")
    if isinstance(balance, bool) or not isinstance(balance, int):
        raise ListingUnusable("an entry without an integer balance_after")
    return balance


def _decide(charge: dict[str, Any], balance_before: int) -> ListedCharge:
    return ListedCharge(charge_id=charge["transaction_id"], paid=_balance(charge) < balance_before)


class _NotRefundable(Exception):
    """The backend gave an answer about a refund that retrying cannot change."""


class ChargeBook:
    """The charges this process makes for gated interactions, and their refunds when those fail.

    A refund is a paid credit the backend adds unconditionally, so two things must never be
    refunded: a charge that did not happen (that would mint a credit) and a charge that used a free
    use (that would turn a free use into a paid credit that never expires). A free use taken by a
    failed interaction is therefore not given back: the backend has no way to.
    """

    def __init__(self, backend: BillingBackend) -> None:
        self.backend = backend
        # Every charge sent, by request, until given back or forgotten (LRU): what a give-back needs.
        self._sent: LRUCache[tuple[tuple[str, str], str], ChargeRecord] = LRUCache(maxsize=100_000)
        # Records whose give-back has begun, out of the LRU: no amount of newer spends evicts them.
        self._owed: dict[tuple[tuple[str, str], str], ChargeRecord] = {}

    async def spend(self, identity: Identity, request_key: str) -> None:
        backend = self.backend
        deadline = backend.deadline(backend.settings.timeout_seconds)
        # Check first: it creates unknown accounts (charges never do) and refuses early when there
        # is no credit. Which pool the charge then takes is not judged from this balance: only the
        # listing can tell that exactly (see `give_back`).
        before = await backend.check(identity, deadline)
        if not before.has_credit:
            raise InsufficientCredit(before.reason or NO_CREDIT)
        slot = (identity.key, request_key)
        record = self._sent[slot] = ChargeRecord(sent_at=time.monotonic())
        reply = await backend.charge(identity, request_key, deadline)
        if reply.status == 404:  # the account vanished between the check and the charge
            await backend.check(identity, deadline)
            reply = await backend.charge(identity, request_key, deadline)
        if reply.status == 201:
            charge_id = reply.body.get("charge_id")
            record.charge_id = charge_id if isinstance(charge_id, str) and charge_id else None
            return
        if reply.status == 409:  # this request was charged by an earlier attempt
            record.charge_id = reply.headers.get("x-existing-charge-id") or None
            return
        self._sent.pop(slot, None)
        if reply.status == 402:
            raise InsufficientCredit(NO_CREDIT)
        if reply.status == 403 and reply.detail.startswith("Account"):
            raise InsufficientCredit("Account closed" if "closed" in reply.detail else "Account suspended")
        raise backend.unexpected("charges", reply)

    async def give_back(self, identity: Identity, request_key: str) -> None:
        """Refund the paid credit taken by this request's charge, if it took one.

        Which pool the charge took is read from the backend's listing (`find_charge`), exact under
        any interleaving of charges and refunds. When that cannot be known yet (the backend is
        down, or a charge whose reply was lost has not shown up), this raises `ProviderUnavailable`
        and the service retries; the refund's idempotency key makes every retry safe. An answer
        that retrying cannot change (the backend refuses the listing or the refund outright) ends
        it with a WARNING naming the request key, for an operator.
        """
        slot = (identity.key, request_key)
        record = self._owed.get(slot) or self._sent.pop(slot, None)
        if record is None:
            return  # not charged by this process: nothing known to return
        await self._refund(identity, request_key, slot, record)

    async def give_back_owed(self, identity: Identity, request_key: str, owed_since: float) -> None:
        """`give_back` for a give-back that was owed before this process knew of it (another
        process, or this one before a restart, charged). Only charges that were sent are ever owed,
        so one is looked for in the listing by its request key; it was sent before `owed_since`,
        which is when its reconcile window is counted from."""
        slot = (identity.key, request_key)
        record = self._owed.get(slot) or self._sent.pop(slot, None)
        if record is None:
            age = max(time.time() - owed_since, 0.0)
            record = ChargeRecord(sent_at=time.monotonic() - age)
        await self._refund(identity, request_key, slot, record)

    async def _refund(
        self, identity: Identity, request_key: str, slot: tuple[tuple[str, str], str], record: ChargeRecord
    ) -> None:
        self._owed[slot] = record
        try:
            charge = await self._listed(identity, request_key, record)
            if charge is None:
                window = self.backend.settings.reconcile_window_seconds
                if time.monotonic() - record.sent_at < window:
                    # The backend finishes requests whose client went away: it may still land.
                    raise ProviderUnavailable("the charge is not listed yet")
                if record.charge_id is None:
                    logger.info("The charge for request key %s never landed; nothing to refund", request_key)
                else:
                    logger.warning("The charge for request key %s is not listed; not refunded", request_key)
            elif charge.paid and await self._may_have_taken_paid(identity):
                reply = await self.backend.refund(identity, request_key)
                if reply.status not in (201, 409):  # 409: made by an earlier attempt
                    raise _NotRefundable(f"the refund was refused with HTTP {reply.status}")
        except _NotRefundable as exc:
            logger.warning("Not refunding the charge for request key %s: %s", request_key, exc)
        self._owed.pop(slot, None)

    async def _may_have_taken_paid(self, identity: Identity) -> bool:
        """A guard on the listing's verdict. One-time free uses are taken before paid credits and
        never come back, so while any remain, no charge of this user has taken a paid credit. The
        listing alone would be misled by a paid-balance change it does not show (the backend's
        `/v1/tools/charge` takes main-pool credits without a listed entry)."""
        return (await self.backend.check(identity)).free_uses_remaining <= 0

    async def _listed(
        self, identity: Identity, request_key: str, record: ChargeRecord
    ) -> ListedCharge | None:
        charge_id = record.charge_id

        def matches(item: dict[str, Any]) -> bool:
            if charge_id is not None:
                return item.get("transaction_id") == charge_id
            return (item.get("metadata") or {}).get("request_id") == request_key or str(
                item.get("description", "")
            ).endswith(request_key)

        async def fetch(limit: int, offset: int) -> dict[str, Any]:
            reply = await self.backend.transactions(identity, limit, offset)
            if reply.status != 200:
                # Also a backend from before the listing existed (404): without it no refund can
                # be proven safe, so none is made.
                raise _NotRefundable(f"the transactions listing answered HTTP {reply.status}")
            body: dict[str, Any] = reply.body
            return body

        try:
            return await find_charge(fetch, matches)
        except ListingUnusable as exc:
            raise _NotRefundable(f"the transactions listing does not fit the contract ({exc})") from None
