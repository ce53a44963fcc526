"""Billing events end to end through `serve`: two worker processes on one PostgreSQL database (or
SQLite file), the grants ledger writing `balance.low` and `balance.exhausted` under concurrent
spends of one user, delivered as signed webhooks (`CIRIS_BILLING_EVENTS_URL`) to a real receiver
that fails for a while: one `balance.low` per crossing arrives, each event once."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import pytest

from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.ledger import Account, ledger_for
from ciris_billing_proxy.providers.simple import LEDGER_FILE
from ciris_billing_proxy.store import Engine, PostgresDatabase, SQLiteDatabase

from .conftest import SECRET
from .event_receiver import Receiver
from .serving import clean_env, serve
from .test_workers import login, request

INTERACT = "/v1/agent/interact"
HOOK_SECRET = "whsec-serve-0123456789abcdef"


async def spend_all(url: str, token: str, count: int) -> collections.Counter[int]:
    """`count` interactions at once, each on a connection of its own (any worker may take it)."""
    replies = await asyncio.gather(
        *(request("POST", f"{url}{INTERACT}", token, json={"message": f"hi {n}"}) for n in range(count))
    )
    return collections.Counter(status for status, _ in replies)


async def until(check: object, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], Engine]:
    """`serve`'s store flags, and an engine on the ledger's database for the test's own grant."""
    if request.param == "sqlite":
        return [], SQLiteDatabase(tmp_path / LEDGER_FILE)  # the workers share the data directory's file
    url = request.getfixturevalue("pg_url")
    return ["--database-url", url], PostgresDatabase(parse_database_url(url), max_size=1)


async def test_one_balance_low_per_crossing_reaches_the_receiver_through_serve(
    tmp_path: Path, store: tuple[list[str], Engine]
) -> None:
    store_args, engine = store
    receiver = Receiver(HOOK_SECRET, mode="fail")
    await receiver.start()
    env = clean_env(
        CIRIS_JWT_SECRET=SECRET,
        CIRIS_BILLING_EVENTS_URL=receiver.url,
        CIRIS_BILLING_EVENTS_SECRET=HOOK_SECRET,
        CIRIS_BILLING_EVENTS_RETRY_MAX_SECONDS="0.5",
        CIRIS_BILLING_LOW_BALANCE_THRESHOLD="3",
        CIRIS_SIMPLE_FREE_USES="10",
    )
    args = ["--workers", "2", "--user", "ann:pw", *store_args, "--no-access-log"]
    with serve(args, tmp_path, env) as server:
        token = await login(server.url)
        # 10 free uses, 25 interactions at once: 10 pass, and the balance crosses 3 once.
        assert await spend_all(server.url, token, 25) == {200: 10, 402: 15}
        await until(lambda: len({a.event_id for a in receiver.attempts}) >= 2)
        receiver.mode = "ok"  # the receiver was failing: every event is retried until it takes it
        # Credit added (re-arms the threshold), then spent in one burst again: a second crossing.
        ledger = ledger_for(engine)
        await ledger.open()
        try:
            await ledger.grant(Account("local", "ann"), 5, "promotional", source="admin", reason="goodwill")
        finally:
            await ledger.close()
        assert await spend_all(server.url, token, 12) == {200: 5, 402: 7}
        await until(lambda: collections.Counter(b["type"] for b in receiver.taken)["balance.exhausted"] == 2)
        await asyncio.sleep(1.5)  # anything sent twice would have come by now
    await receiver.stop()
    assert all(attempt.signed for attempt in receiver.attempts)
    ids = receiver.ids()
    assert len(ids) == len(set(ids))  # each event once: the leases kept the two workers apart
    kinds = collections.Counter(body["type"] for body in receiver.taken)
    assert kinds["balance.low"] == 2
    assert kinds["balance.exhausted"] == 2
    lows = [body for body in receiver.taken if body["type"] == "balance.low"]
    assert {(body["user_id"], body["namespace"]) for body in lows} == {("ann", "local")}
    assert sorted(body["data"]["balance_after"] for body in lows) == [3, 3]
    assert all(body["data"]["threshold"] == 3 for body in lows)
    assert any(body["type"] == "credit.granted" and body["data"]["amount"] == 5 for body in receiver.taken)
    assert any(a.status == 500 for a in receiver.attempts)  # it did fail before it took them
