"""Two `serve` processes on one PostgreSQL database and one billing backend act as one agent for
purchases (replays, double clicks, simultaneous initiates, ownership) and the login throttle; and
`serve --fake-backend --database-url` keeps the ciris provider's records in that database."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp

from ciris_billing_proxy.testing import FakeBillingBackend

from .conftest import SECRET
from .default_paths import INITIATE, LOGIN, STATUS
from .postgres import fetch
from .serving import clean_env, login, serve

USERS = ["--user", "ann:pw:ann@example.com", "--user", "bob:pw:bob@example.com"]


async def _initiate(session: aiohttp.ClientSession, url: str, token: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with session.post(f"{url}{INITIATE}", json={}, headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_two_serve_processes_on_one_backend_and_database_make_one_payment_per_purchase(
    pg_url: str, tmp_path: Path
) -> None:
    with FakeBillingBackend().run_in_thread() as fake:
        env = clean_env(
            CIRIS_JWT_SECRET=SECRET, CIRIS_BILLING_API_URL=fake.url, CIRIS_BILLING_API_KEY=fake.api_key
        )
        args = ["--provider", "ciris", "--database-url", pg_url, *USERS]
        with serve(args, tmp_path / "one", env) as one, serve(args, tmp_path / "two", env) as two:
            async with aiohttp.ClientSession() as session:
                ann = await login(session, one.url, "ann", "pw")
                bob = await login(session, two.url, "bob", "pw")

                first = await _initiate(session, one.url, ann, "buy-1")
                fake.ledger.clock_offset += timedelta(seconds=1.5)
                assert await _initiate(session, two.url, ann, "buy-1") == first
                assert len(fake.ledger.payments) == 1

                fake.inject("latency", endpoint="purchases", seconds=0.3)
                clicks = await asyncio.gather(
                    *(_initiate(session, (one, two)[i % 2].url, bob) for i in range(6))
                )
                fake.clear_faults()
                assert len({c["payment_id"] for c in clicks}) == 1
                assert len(fake.ledger.payments) == 2

                mine = f"{two.url}{STATUS}{first['payment_id']}"
                async with session.get(mine, headers={"Authorization": f"Bearer {ann}"}) as r:
                    assert (r.status, (await r.json())["status"]) == (200, "requires_payment_method")
                async with session.get(mine, headers={"Authorization": f"Bearer {bob}"}) as r:
                    assert (r.status, await r.json()) == (404, {"detail": "Payment not found"})
                fake.confirm_payment(first["payment_id"])
                async with session.get(mine, headers={"Authorization": f"Bearer {ann}"}) as r:
                    assert (await r.json())["status"] == "succeeded"

                async def fail(url: str) -> int:
                    body = {"username": "carl", "password": "guess"}
                    async with session.post(f"{url}{LOGIN}", json=body) as r:
                        return r.status

                statuses = await asyncio.gather(*(fail((one, two)[i % 2].url) for i in range(12)))
                assert (statuses.count(401), statuses.count(429)) == (5, 7)
        output = "".join(one.output + two.output)
        assert first["client_secret"] not in output
        assert fake.api_key not in output
    assert await fetch(pg_url, "SELECT count(*) FROM payments") == [(2,)]


async def test_serve_fake_backend_keeps_its_payments_where_database_url_says(
    pg_url: str, tmp_path: Path
) -> None:
    env = clean_env(CIRIS_JWT_SECRET=SECRET)
    with serve(["--fake-backend", "--database-url", pg_url, *USERS], tmp_path, env) as server:
        assert re.search(r"Fake CIRIS Billing backend on http://", "".join(server.output))
        async with aiohttp.ClientSession() as session:
            bought = await _initiate(session, server.url, await login(session, server.url, "ann", "pw"), "k")
    assert await fetch(pg_url, "SELECT payment_id, user_id FROM payments") == [(bought["payment_id"], "ann")]
    assert sorted(await fetch(pg_url, "SELECT kind, payment_id FROM purchase_replays")) == [
        ("key", bought["payment_id"]),
        ("latest", bought["payment_id"]),
    ]
