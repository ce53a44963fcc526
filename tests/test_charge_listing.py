"""`find_charge`: which pool a charge took, read from pages of the backend's listing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciris_billing_proxy import Identity, ProviderUnavailable
from ciris_billing_proxy.providers.ciris.charges import ListingUnusable, find_charge
from ciris_billing_proxy.retries import GiveBackRetries


def entry(n: int, kind: str, balance: int) -> dict[str, Any]:
    return {"transaction_id": f"t{n}", "type": kind, "balance_after": balance, "description": f"d{n}"}


class Listing:
    """A newest-first listing that grows at the top between page reads, as a busy account's does."""

    def __init__(self, entries: list[dict[str, Any]], grow_by: int = 0) -> None:
        self.entries = list(entries)  # oldest first
        self.grow_by = grow_by
        self.pages = 0

    async def fetch(self, limit: int, offset: int) -> dict[str, Any]:
        newest_first = self.entries[::-1]
        page = newest_first[offset : offset + limit]
        self.pages += 1
        for _ in range(self.grow_by):
            self.entries.append(entry(1000 + len(self.entries), "credit", 99))
        return {
            "transactions": page,
            "total_count": len(newest_first),
            "has_more": offset + limit < len(newest_first),
        }


def named(n: int) -> Any:
    return lambda item: item["transaction_id"] == f"t{n}"


@pytest.mark.parametrize("grow_by", [0, 7, 60])
async def test_the_entry_before_a_charge_decides_even_across_pages_that_shift(grow_by: int) -> None:
    # A paid balance of 300 spent one credit at a time: every charge took a paid credit, except
    # t250, which took a free use (the balance stayed), and refunds in between.
    entries, balance = [entry(0, "credit", 300)], 300
    for n in range(1, 400):
        if n == 250:
            entries.append(entry(n, "charge", balance))
        elif n % 10 == 0:
            balance += 1
            entries.append(entry(n, "credit", balance))
        else:
            balance -= 1
            entries.append(entry(n, "charge", balance))
    for n, paid in [(399, True), (301, True), (250, False), (201, True), (1, True)]:
        listing = Listing(entries, grow_by)
        found = await find_charge(listing.fetch, named(n))
        assert found is not None
        assert (found.charge_id, found.paid) == (f"t{n}", paid)


async def test_the_first_entry_of_an_account_is_a_free_use() -> None:
    listing = Listing([entry(0, "charge", 0)])
    found = await find_charge(listing.fetch, named(0))
    assert found is not None
    assert not found.paid


async def test_a_charge_not_listed_is_none_and_the_search_is_bounded() -> None:
    listing = Listing([entry(n, "charge", 0) for n in range(500)])
    assert await find_charge(listing.fetch, named(9999), max_pages=3) is None
    assert listing.pages == 3
    assert await find_charge(Listing([]).fetch, named(1)) is None


@pytest.mark.parametrize(
    "page",
    [
        {"transactions": None},
        {"transactions": [{"type": "charge"}]},
        {
            "transactions": [entry(1, "charge", 5), {**entry(0, "credit", 6), "balance_after": "6"}],
            "has_more": False,
        },
    ],
)
async def test_a_listing_out_of_contract_is_refused(page: dict[str, Any]) -> None:
    async def fetch(limit: int, offset: int) -> dict[str, Any]:
        return page

    with pytest.raises(ListingUnusable):
        await find_charge(fetch, lambda item: item.get("transaction_id") == "t1")


async def test_retries_go_on_until_the_give_back_succeeds_and_once_per_key() -> None:
    calls: list[str] = []

    async def give_back(identity: Identity, key: str) -> None:
        calls.append(key)
        if len(calls) < 4:
            raise ProviderUnavailable("down")

    retries = GiveBackRetries(give_back, max_interval=0.01)
    alice = Identity("alice", "local", "OBSERVER")
    retries.schedule(alice, "k1")
    retries.schedule(alice, "k1")
    assert len(retries) == 1
    for _ in range(200):
        if not len(retries):
            break
        await asyncio.sleep(0.01)
    assert calls == ["k1"] * 4
    await retries.aclose()


async def test_shutdown_counts_every_give_back_still_owed() -> None:
    async def never(identity: Identity, key: str) -> None:
        raise ProviderUnavailable("down")

    retries = GiveBackRetries(never, max_interval=0.01)
    retries.schedule(Identity("bob", "local", "OBSERVER"), "owed-key")
    await asyncio.sleep(0.05)
    assert await retries.aclose() == 1
    assert not len(retries)
    assert not retries.schedule(Identity("bob", "local", "OBSERVER"), "later-key")


async def test_the_entry_before_a_charge_at_a_page_edge_is_found_on_the_shifted_next_page() -> None:
    # t100 took a free use (balance unchanged) and is the last entry of the first page; newer entries
    # are refunds that keep landing while the pages are read, so the next page repeats entries.
    entries, balance = [entry(0, "credit", 300)], 300
    for n in range(1, 200):
        if n == 100:
            entries.append(entry(n, "charge", balance))
        elif n < 100:
            balance -= 1
            entries.append(entry(n, "charge", balance))
        else:
            balance += 1
            entries.append(entry(n, "credit", balance))
    found = await find_charge(Listing(entries, grow_by=5).fetch, named(100))
    assert found is not None
    assert not found.paid
