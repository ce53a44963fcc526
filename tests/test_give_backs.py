"""The store of owed give-backs, on SQLite and PostgreSQL: claims that two stores (as two processes
would) never both hold, a claim of a stopped process taken over once it expires, and the spool."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ciris_billing_proxy import Identity
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.ops.outbox import GiveBackOutbox
from ciris_billing_proxy.ops.spool import Spool
from ciris_billing_proxy.store import Engine, PostgresDatabase, SQLiteDatabase
from ciris_billing_proxy.store.give_backs import GiveBackStore, Owed, give_back_store

ANN = Identity("ann", "local", "OBSERVER", email="ann@example.com", tenant="t1")


def owed(n: int) -> Owed:
    return Owed(ANN, f"key-{n:03d}", "the interaction failed (HTTP 502)", time.time() - 60 + n)


@pytest.fixture(params=["sqlite", "postgresql"])
def engines(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Engine]:
    if request.param == "sqlite":
        return lambda: SQLiteDatabase(tmp_path / "give-backs.sqlite3")
    url = parse_database_url(request.getfixturevalue("pg_url"))
    return lambda: PostgresDatabase(url, max_size=2)


@pytest.fixture
async def two_stores(engines: Callable[[], Engine]) -> AsyncIterator[tuple[GiveBackStore, GiveBackStore]]:
    """Two stores on one database, each with an engine of its own (two processes)."""
    first, second = give_back_store(engines()), give_back_store(engines())
    await first.open()
    await second.open()
    yield first, second
    await first.close()
    await second.close()


async def test_two_claimers_at_once_never_hold_one_give_back_both(
    two_stores: tuple[GiveBackStore, GiveBackStore],
) -> None:
    first, second = two_stores
    await first.add([owed(n) for n in range(200)], None, 0.0)
    claimed: dict[str, list[str]] = {"a": [], "b": []}

    async def drain(store: GiveBackStore, token: str) -> None:
        while batch := await store.claim(token, 60.0, 7):
            claimed[token] += [row.request_key for row in batch]
            await asyncio.sleep(0)

    await asyncio.gather(drain(first, "a"), drain(second, "b"))
    assert not set(claimed["a"]) & set(claimed["b"])
    assert sorted(claimed["a"] + claimed["b"]) == [owed(n).request_key for n in range(200)]


async def test_a_claim_expires_and_is_taken_over_once_with_the_identity_whole(
    two_stores: tuple[GiveBackStore, GiveBackStore],
) -> None:
    first, second = two_stores
    await first.add([owed(1)], "dead-process", 0.3)
    await first.add([owed(1)], None, 0.0)  # owed again: the row stays as it was
    assert await second.claim("alive", 60.0, 10) == []
    await asyncio.sleep(0.4)
    (row,) = await second.claim("alive", 60.0, 10)
    assert (row.identity, row.request_key, row.why, row.attempts) == (ANN, "key-001", owed(1).why, 1)
    assert row.identity.key == ANN.key
    assert await first.claim("late", 60.0, 10) == []
    await second.release("alive")
    (again,) = await first.claim("next", 60.0, 10)
    assert again.attempts == 2
    await first.remove([again.slot])
    assert await second.all() == []


async def test_renewed_claims_are_not_taken_over(two_stores: tuple[GiveBackStore, GiveBackStore]) -> None:
    first, second = two_stores
    await first.add([owed(1), owed(2)], "busy", 0.3)
    for _ in range(3):
        await asyncio.sleep(0.15)
        await first.renew("busy", 0.3)
    assert await second.claim("other", 60.0, 10) == []


def test_the_spool_keeps_what_is_owed_until_dropped_and_lines_added_meanwhile(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    assert spool.take() is None
    spool.owe(owed(1), "p1")
    spool.owe(owed(2), "p1")
    spool.made(owed(1).slot)
    with (tmp_path / "spool.jsonl").open("ab") as fh:
        fh.write(b'{"owe": {"namespace": 1}}\n{"owe": {"namesp')  # a bad line, and one cut short
    taken = spool.take()
    assert taken is not None
    assert [(row.request_key, by) for row, by in taken.owed.values()] == [("key-002", "p1")]
    assert taken.made == {owed(1).slot}
    (row, _by) = taken.owed[owed(2).slot]
    assert row.identity == ANN
    spool.owe(owed(3), "p2")  # while the taken lines are being kept elsewhere
    spool.drop(taken)
    again = spool.take()
    assert again is not None
    assert [row.request_key for row, _ in again.owed.values()] == ["key-003"]
    assert (tmp_path / "spool.jsonl").stat().st_mode & 0o777 == 0o600


async def test_two_outboxes_importing_one_spool_at_once_lose_no_line_appended_meanwhile(
    tmp_path: Path,
) -> None:
    # Two processes of one data directory (each its own store connection), the store back after an
    # outage: while the first moves the spool into the store, the second tries too and a third
    # give-back is spooled. Before the import lock, the second's `drop` cut that line away.
    spool_path = tmp_path / "give-backs-owed.jsonl"
    first = GiveBackOutbox(give_back_store(SQLiteDatabase(tmp_path / "gb.sqlite3")), spool_path, period=1)
    second = GiveBackOutbox(give_back_store(SQLiteDatabase(tmp_path / "gb.sqlite3")), spool_path, period=1)
    await first.open()
    await second.open()
    try:
        first.spool.owe(owed(1), "gone")
        keeping, go_on = asyncio.Event(), asyncio.Event()
        real_add = first.store.add

        async def slow_add(*args: object, **kwargs: object) -> None:
            keeping.set()
            await go_on.wait()
            await real_add(*args, **kwargs)  # type: ignore[arg-type]

        first.store.add = slow_add  # type: ignore[method-assign]
        importing = asyncio.create_task(first.import_spool())
        await keeping.wait()
        assert await second.import_spool() == 0  # one importer at a time; it tries next round
        second.spool.owe(owed(2), "gone")  # spooled while the first is still importing
        go_on.set()
        assert await importing == 1
        assert await second.import_spool() == 1  # the line appended meanwhile is still there
        kept = await second.store.claim("checker", 30.0, 10)
        assert sorted(row.request_key for row in kept) == ["key-001", "key-002"]
    finally:
        await first.close()
        await second.close()


async def test_a_store_refusing_an_owed_give_back_in_any_way_leaves_it_in_the_spool(tmp_path: Path) -> None:
    outbox = GiveBackOutbox(
        give_back_store(SQLiteDatabase(tmp_path / "gb.sqlite3")), tmp_path / "give-backs-owed.jsonl", period=1
    )
    await outbox.open()
    try:

        async def corrupt(*_args: object, **_kwargs: object) -> None:
            raise sqlite3.DatabaseError("database disk image is malformed")

        outbox.store.add = corrupt  # type: ignore[method-assign]
        # Not only ProviderUnavailable: a corrupt file or a read-only replica must not lose it.
        assert await outbox.owe(owed(7)) is True
        taken = outbox.spool.take()
        assert taken is not None
        assert [row.request_key for row, _ in taken.owed.values()] == ["key-007"]
    finally:
        await outbox.close()
