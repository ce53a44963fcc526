"""The credit ledger on both engines: the spending order, expiry to the second with a clock the test
holds, give-backs to the grant each use came from, reservations, claw-backs, the events it writes
to the outbox (once per crossing, also under concurrent spends from two ledgers on one database),
and the upgrade of a usage ledger from before grants."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ciris_billing_proxy import Identity, ProviderContext
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.ledger import Account, Ledger, NoReservation, Overdrawn, Usage, ledger_for
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store import Engine, PostgresDatabase, SQLiteDatabase

from .postgres import fetch

T0 = 1_800_000_000.0
ANN = Account("local", "ann")


class Clock:
    """The ledger's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_of(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Engine]:
    """Makes engines on one database (each a process's own connections)."""
    if request.param == "sqlite":
        return lambda: SQLiteDatabase(tmp_path / "ledger.sqlite3")
    url = parse_database_url(request.getfixturevalue("pg_url"))
    return lambda: PostgresDatabase(url, max_size=4)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(engine_of: Callable[[], Engine], clock: Clock) -> AsyncIterator[Ledger]:
    ledger = ledger_for(engine_of(), clock=clock, low_balance_threshold=3)
    await ledger.open()
    yield ledger
    await ledger.close()


async def rows_of(ledger: Ledger, query: str) -> list[Any]:
    """The rows a query of the ledger's database returns, on either engine."""
    if isinstance(ledger.engine, SQLiteDatabase):
        return await ledger.engine.run(lambda conn: conn.execute(query).fetchall())
    assert isinstance(ledger.engine, PostgresDatabase)
    async with ledger.engine.connection() as conn:
        return list(await conn.fetch(query))


async def outbox(ledger: Ledger, kind: str | None = None) -> list[dict[str, Any]]:
    """The events in the outbox (of one kind), oldest first, their data parsed."""
    rows = await rows_of(ledger, "SELECT kind, data FROM billing_events ORDER BY seq")
    return [{"kind": k, **json.loads(d)} for k, d in rows if kind is None or k == kind]


async def remaining(ledger: Ledger, account: Account = ANN) -> dict[int, int]:
    return {g.id: g.remaining for g in await ledger.grants(account)}


async def test_spends_take_free_then_soonest_expiring_then_paid(ledger: Ledger) -> None:
    t = int(T0)
    order = [
        ("paid", None),
        ("promotional", None),
        ("paid", t + 200),
        ("promotional", t + 50),
        ("free", None),
        ("free", t + 100),
    ]
    ids = []
    for kind, expires_at in order:
        granted = await ledger.grant(ANN, 1, kind, source="admin", reason="goodwill", expires_at=expires_at)
        ids.append(granted.grant.id)
    taken = []
    for n in range(len(order)):
        before = await remaining(ledger)
        assert await ledger.spend(ANN, f"k{n}") is not None
        after = await remaining(ledger)
        taken += [grant_id for grant_id in before if before[grant_id] != after[grant_id]]
    paid, promo, paid_expiring, promo_expiring, free, free_expiring = ids
    assert taken == [free_expiring, free, promo_expiring, paid_expiring, promo, paid]
    assert await ledger.spend(ANN, "one-more") is None


async def test_a_grant_counts_until_the_second_it_expires_and_is_announced_once(
    ledger: Ledger, clock: Clock, engine_of: Callable[[], Engine]
) -> None:
    expires_at = int(T0) + 10
    await ledger.grant(ANN, 5, "promotional", source="admin", reason="promotion", expires_at=expires_at)
    clock.now = expires_at - 0.001
    balance = await ledger.balance(ANN)
    assert (balance.credits, balance.soonest_expiry) == (5, expires_at)
    assert await ledger.expire_due() == 0
    assert await ledger.spend(ANN, "before") is not None
    clock.now = expires_at
    balance = await ledger.balance(ANN)
    assert (balance.credits, balance.soonest_expiry) == (0, None)
    assert await ledger.spend(ANN, "at-expiry") is None
    # Two sweepers on the database at once (two processes): the expiry is announced once.
    other = ledger_for(engine_of(), clock=clock)
    await other.open()
    try:
        counts = await asyncio.gather(*(sweeper.expire_due() for sweeper in (ledger, other, ledger, other)))
    finally:
        await other.close()
    assert sorted(counts) == [0, 0, 0, 1]
    expired = await outbox(ledger, "credit.expired")
    assert [(e["amount"], e["balance_after"], e["expired_at"]) for e in expired] == [(4, 0, expires_at)]
    entries, _ = await ledger.entries(ANN, 10, 0)
    assert [(e.kind, e.amount) for e in entries][:1] == [("expire", -4)]


async def test_a_give_back_returns_each_use_to_the_grant_it_came_from(ledger: Ledger, clock: Clock) -> None:
    free = (await ledger.grant(ANN, 2, "free", source="admin", reason="goodwill")).grant.id
    promo_expiring = int(T0) + 60
    promo = (
        await ledger.grant(
            ANN, 3, "promotional", source="admin", reason="promotion", expires_at=promo_expiring
        )
    ).grant.id
    paid = (await ledger.grant(ANN, 10, "paid", source="purchase", reason="purchase")).grant.id
    assert await ledger.spend(ANN, "big", 6) is not None
    assert await remaining(ledger) == {free: 0, promo: 0, paid: 9}
    assert await ledger.spend(ANN, "small", 2) is not None
    assert await remaining(ledger) == {free: 0, promo: 0, paid: 7}
    back = await ledger.give_back(ANN, "big")
    assert back is not None
    assert await remaining(ledger) == {free: 2, promo: 3, paid: 8}
    assert await ledger.give_back(ANN, "big") is None  # once
    assert await remaining(ledger) == {free: 2, promo: 3, paid: 8}
    # A use given back to a grant that expired meanwhile stays expired with it.
    assert await ledger.spend(ANN, "late", 5) is not None
    clock.now = promo_expiring
    await ledger.give_back(ANN, "late")
    balance = await ledger.balance(ANN)
    assert (balance.free, balance.credits) == (2, 8)
    assert await remaining(ledger) == {free: 2, promo: 3, paid: 8}


async def test_a_reservation_keeps_what_is_settled_and_gives_the_rest_back(ledger: Ledger) -> None:
    await ledger.grant(ANN, 10, "paid", source="purchase", reason="purchase")
    after = await ledger.reserve(ANN, "r", 8)
    assert after is not None
    assert after.total == 2
    assert await ledger.reserve(ANN, "r2", 3) is None  # the reservation holds its credit
    usage = Usage(model="gpt-x", input_tokens=1200, output_tokens=300, metadata={"turns": 2})
    settled = await ledger.settle(ANN, "r", 3, usage)
    assert (settled.total, settled.used) == (7, 3)
    assert (await ledger.settle(ANN, "r", 1)).total == 7  # once
    assert (await ledger.give_back(ANN, "r") or pytest.fail("nothing given back")).total == 10
    with pytest.raises(NoReservation):
        await ledger.settle(ANN, "never", 1)
    # More than reserved keeps the reservation, no more.
    await ledger.reserve(ANN, "r3", 4)
    assert (await ledger.settle(ANN, "r3", 99)).total == 6
    entries, _ = await ledger.entries(ANN, 20, 0)
    assert [e.kind for e in entries] == ["settle", "reserve", "give_back", "settle", "reserve", "grant"]
    assert entries[3].usage == usage


async def test_concurrent_reservations_from_two_ledgers_keep_exactly_what_was_settled(
    engine_of: Callable[[], Engine], clock: Clock
) -> None:
    ledgers = [ledger_for(engine_of(), clock=clock) for _ in range(2)]
    for one in ledgers:
        await one.open()
    try:
        await ledgers[0].grant(ANN, 100, "paid", source="purchase", reason="purchase")

        async def request(n: int) -> int:
            one = ledgers[n % 2]
            if await one.reserve(ANN, f"r{n}", 5) is None:
                return 0
            if n % 4 == 0:  # the handler failed: all of it back
                await one.give_back(ANN, f"r{n}")
                return 0
            cost = n % 6
            await one.settle(ANN, f"r{n}", cost)
            return min(cost, 5)

        kept = await asyncio.gather(*(request(n) for n in range(60)))
        balance = await ledgers[1].balance(ANN)
        assert balance.total == 100 - sum(kept)
        assert balance.used == sum(kept)
        assert sum((await remaining(ledgers[0])).values()) == 100 - sum(kept)
    finally:
        for one in ledgers:
            await one.close()


async def test_one_balance_low_per_crossing_under_concurrent_spends(
    engine_of: Callable[[], Engine], clock: Clock
) -> None:
    ledgers = [ledger_for(engine_of(), clock=clock, low_balance_threshold=5) for _ in range(2)]
    for one in ledgers:
        await one.open()
    try:
        await ledgers[0].grant(ANN, 20, "paid", source="purchase", reason="purchase")
        spent = await asyncio.gather(*(ledgers[n % 2].spend(ANN, f"a{n}", 1 + n % 2) for n in range(30)))
        taken = sum(1 + n % 2 for n, after in enumerate(spent) if after is not None)
        assert taken == 20 - (await ledgers[0].balance(ANN)).total
        low = await outbox(ledgers[0], "balance.low")
        assert len(low) == 1
        assert low[0]["balance_before"] > 5 >= low[0]["balance_after"]
        assert len(await outbox(ledgers[0], "balance.exhausted")) == (1 if taken == 20 else 0)
        # Back above the threshold and down again: a second crossing, a second event.
        await ledgers[1].grant(ANN, 10, "promotional", source="admin", reason="goodwill")
        await asyncio.gather(*(ledgers[n % 2].spend(ANN, f"b{n}") for n in range(12)))
        assert len(await outbox(ledgers[0], "balance.low")) == 2
        granted = await outbox(ledgers[0], "credit.granted")
        assert [(g["amount"], g["kind"], g["reason"]) for g in granted] == [
            (20, "paid", "purchase"),
            (10, "promotional", "goodwill"),
        ]
    finally:
        for one in ledgers:
            await one.close()


async def test_a_claw_back_beyond_the_balance_is_refused_whole(ledger: Ledger) -> None:
    await ledger.grant(ANN, 4, "paid", source="purchase", reason="purchase")
    with pytest.raises(Overdrawn) as refused:
        await ledger.claw_back(ANN, 5, reason="chargeback", actor="local:root")
    assert refused.value.balance == 4
    assert (await ledger.balance(ANN)).total == 4
    partial = await ledger.claw_back(ANN, 5, reason="chargeback", partial=True, key="cb-1")
    assert (partial.taken, partial.balance.total) == (4, 0)
    assert (await ledger.claw_back(ANN, 5, reason="chargeback", key="cb-1")).replayed
    clawed = await outbox(ledger, "credit.clawed_back")
    assert [(c["amount"], c["reason"], c["balance_after"]) for c in clawed] == [(4, "chargeback", 0)]


async def test_idempotent_grants_and_spends_count_once(ledger: Ledger) -> None:
    first = await asyncio.gather(
        *(ledger.grant(ANN, 7, "paid", source="purchase", reason="purchase", key="pi_1") for _ in range(5))
    )
    assert len({g.grant.id for g in first}) == 1
    assert sum(not g.replayed for g in first) == 1
    spends = await asyncio.gather(*(ledger.spend(ANN, "same", 3) for _ in range(5)))
    assert all(after is not None for after in spends)
    assert (await ledger.balance(ANN)).total == 4
    assert await ledger.spend(ANN, "drain", 4) is not None
    # With nothing left, a key that spent before still answers as spent; a new one does not.
    assert await ledger.spend(ANN, "same", 3) == await ledger.balance(ANN)
    assert await ledger.spend(ANN, "new", 1) is None


ODD = Account('ns "q" \\ \u00fc', "\u00e4nn\u00e4\u2028\x7f\t\U0001f600")


async def test_balance_events_hold_the_bytes_python_writes(ledger: Ledger) -> None:
    """On PostgreSQL the database writes a spend's events (`schema._TAKE`): the same bytes as
    `store.events` writes from Python, whatever the identity and the key hold."""
    await ledger.grant(ODD, 4, "paid", source="purchase", reason="purchase")
    key = 'k\u00e9y "1"\n\\\U0001f600'
    assert await ledger.spend(ODD, key, 2) is not None  # 4 to 2: below the threshold of 3
    assert await ledger.spend(ODD, "k2", 2) is not None  # 2 to 0: exhausted
    rows = await rows_of(
        ledger, "SELECT event_id, kind, namespace, user_id, data, created_at FROM billing_events ORDER BY seq"
    )
    identity = {"namespace": ODD.namespace, "user_id": ODD.user_id}
    expected = [
        ("balance.low", {"balance_before": 4, "balance_after": 2, "threshold": 3, "key": key}),
        ("balance.exhausted", {"balance_before": 2, "balance_after": 0, "threshold": 3, "key": "k2"}),
    ]
    spent = [tuple(r) for r in rows if r[1] != "credit.granted"]
    assert [r[1:5] for r in spent] == [
        (
            kind,
            ODD.namespace,
            ODD.user_id,
            json.dumps({**identity, **data}, separators=(",", ":"), sort_keys=True),
        )
        for kind, data in expected
    ]
    for event_id, *_, created_at in spent:
        assert re.fullmatch("evt_[0-9a-f]{24}", event_id)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?\+00:00", created_at)
    assert len({r[0] for r in spent}) == 2


async def test_every_write_of_an_account_on_postgresql_moves_its_version(pg_url: str, clock: Clock) -> None:
    """During a rolling upgrade processes of the first ledger release still spend in one statement
    that writes only while the account's version is the one they read: every write of the account
    by this release must move it, so theirs fails and they take their locked path."""
    ledger = ledger_for(PostgresDatabase(parse_database_url(pg_url)), clock=clock, signup=lambda _: 3)
    await ledger.open()
    try:
        versions = []

        async def version() -> None:
            rows = await fetch(pg_url, "SELECT version FROM credit_accounts WHERE user_id = 'ann'")
            versions.append(rows[0][0])

        await ledger.spend(ANN, "first")  # makes the account and its signup grant
        await version()
        await ledger.grant(ANN, 5, "paid", source="purchase", reason="purchase")
        await version()
        await ledger.spend(ANN, "s1", 2)
        await version()
        await ledger.reserve(ANN, "r1", 3)
        await version()
        await ledger.settle(ANN, "r1", 1)
        await version()
        await ledger.give_back(ANN, "s1")
        await version()
        await ledger.claw_back(ANN, 1, reason="correction")
        await version()
        assert versions == sorted(set(versions)), versions
    finally:
        await ledger.close()


# -- the usage ledger from before grants ---------------------------------------------------------
OLD_SCHEMA = """
CREATE TABLE schema_version (component TEXT NOT NULL, version INTEGER NOT NULL, applied_at {at},
    PRIMARY KEY (component, version));
INSERT INTO schema_version VALUES ('usage', 1, '2026-01-01T00:00:00+00:00');
CREATE TABLE usage (namespace TEXT NOT NULL, user_id TEXT NOT NULL,
    used INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0), PRIMARY KEY (namespace, user_id));
CREATE TABLE usage_events (id {id}, namespace TEXT NOT NULL, user_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('use', 'give_back')),
    used_after INTEGER NOT NULL, created_at TEXT NOT NULL,
    UNIQUE (namespace, user_id, idempotency_key, kind));
INSERT INTO usage VALUES
    ('local', 'ann', 3), ('local', 'bob', 12), ('web_search' || {sep} || 'local', 'ann', 2);
INSERT INTO usage_events (namespace, user_id, idempotency_key, kind, used_after, created_at) VALUES
    ('local', 'ann', 'k1', 'use', 1, '2026-01-01T00:00:01+00:00'),
    ('local', 'ann', 'k2', 'use', 2, '2026-01-01T00:00:02+00:00'),
    ('local', 'ann', 'k3', 'use', 3, '2026-01-01T00:00:03+00:00'),
    ('local', 'ann', 'k4', 'use', 4, '2026-01-01T00:00:04+00:00'),
    ('local', 'ann', 'k4', 'give_back', 3, '2026-01-01T00:00:05+00:00')
"""


async def test_an_old_usage_file_keeps_every_users_spent_count(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "simple-usage.sqlite3") as conn:
        conn.executescript(OLD_SCHEMA.format(at="TEXT NOT NULL", id="INTEGER PRIMARY KEY", sep="char(31)"))
    await upgraded(ProviderContext(data_dir=tmp_path))


async def test_an_old_usage_database_on_postgresql_keeps_every_users_spent_count(
    tmp_path: Path, pg_url: str
) -> None:
    script = OLD_SCHEMA.format(
        at="TIMESTAMPTZ NOT NULL DEFAULT now()",
        id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        sep="chr(31)",
    )
    for statement in script.split(";"):
        await fetch(pg_url, statement)
    await upgraded(ProviderContext(data_dir=tmp_path, database_url=pg_url))


async def upgraded(context: ProviderContext) -> None:
    ann, bob = Identity("ann", "local", "OBSERVER"), Identity("bob", "local", "OBSERVER")
    provider = SimpleProvider.from_context(
        ProviderContext(
            options={"free_uses": 10, "products": {"web_search": {"free_uses": 5}}},
            data_dir=context.data_dir,
            database_url=context.database_url,
        )
    )
    await provider.start()
    try:
        status = await provider.credit_status(ann)
        assert (status.free_uses_remaining, status.total_uses) == (7, 3)
        assert (await provider.credit_status(bob)).free_uses_remaining == 0  # spent past the limit
        assert (await provider.product_balance(ann, "web_search")).free_remaining == 3
        history = await provider.transactions(ann, 10, 0)
        assert [(t.transaction_type, t.balance_after) for t in history.transactions] == [
            ("give_back", 7),
            ("spend", 6),
            ("spend", 7),
            ("spend", 8),
            ("spend", 9),
        ]
        # A use spent before the upgrade is given back once, to the signup grant made since.
        after = await provider.spend(ann, "new")
        assert (after.free_uses_remaining, after.total_uses) == (6, 4)
        await provider.give_back(ann, "k3")
        await provider.give_back(ann, "k3")
        await provider.give_back(ann, "k4")  # given back before the upgrade
        status = await provider.credit_status(ann)
        assert (status.free_uses_remaining, status.total_uses) == (7, 3)
    finally:
        await provider.stop()
