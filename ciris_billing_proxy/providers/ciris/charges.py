"""Which pool a charge took, decided exactly from the backend's transaction listing.

The charge reply does not say whether it took a free use or a paid credit, only the paid balance
after it (docs/billing-backend.md 3.2). Comparing that with a balance read at another moment races with
every other charge and refund of the same user. The listing (3.9) orders every charge and credit of
an account, newest first, each with its `balance_after`: a charge took a paid credit exactly when
its `balance_after` is below that of the entry just before it. That holds under any interleaving,
whichever process made the other entries, so this is the only rule used to decide a refund.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

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
