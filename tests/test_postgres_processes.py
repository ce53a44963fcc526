"""Real processes on one PostgreSQL database: two `serve`s sharing spends, concurrent first starts
migrating once, and one-line exits when the database cannot be used."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from .conftest import SECRET
from .postgres import fetch
from .serving import clean_env, login, serve

MIGRATE = [sys.executable, "-m", "ciris_billing_proxy", "migrate", "--database-url"]


async def test_two_serve_processes_share_the_free_uses(pg_url: str, tmp_path: Path) -> None:
    env = clean_env(CIRIS_JWT_SECRET=SECRET)
    args = ["--database-url", pg_url, "--provider-option", "free_uses=10", "--user", "ann:pw"]
    with serve(args, tmp_path / "one", env) as one, serve(args, tmp_path / "two", env) as two:
        assert "records in PostgreSQL postgres@" in one.output[-1]
        async with aiohttp.ClientSession() as session:
            auth = {"Authorization": f"Bearer {await login(session, one.url, 'ann', 'pw')}"}

            async def interact(url: str) -> int:
                async with session.post(f"{url}/v1/agent/interact", json={"message": "x"}, headers=auth) as r:
                    return r.status

            statuses = await asyncio.gather(*(interact((one, two)[i % 2].url) for i in range(40)))
            assert statuses.count(200) == 10
            assert statuses.count(402) == 30
            async with session.get(f"{two.url}/v1/api/billing/credits", headers=auth) as r:
                assert (await r.json())["total_uses"] == 10
    assert await fetch(pg_url, "SELECT used FROM credit_accounts") == [(10,)]


async def test_five_processes_migrating_one_new_database_at_once_apply_each_step_once(pg_url: str) -> None:
    processes = [
        await asyncio.create_subprocess_exec(
            *MIGRATE, pg_url, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()
        )
        for _ in range(5)
    ]
    results = [await p.communicate() for p in processes]
    assert [p.returncode for p in processes] == [0] * 5, results
    # Each kind of record is migrated in a transaction of its own: which process applies which is luck.
    parts = [part for out, _ in results for part in out.decode().strip().split(": ", 1)[1].split(", ")]
    assert sorted(parts) == [
        "audit at version 1 (1 step(s) applied)",
        *["audit at version 1 (up to date)"] * 4,
        "change_feed at version 2 (2 step(s) applied)",
        *["change_feed at version 2 (up to date)"] * 4,
        "events at version 1 (1 step(s) applied)",
        *["events at version 1 (up to date)"] * 4,
        "give_backs at version 1 (1 step(s) applied)",
        *["give_backs at version 1 (up to date)"] * 4,
        "ledger at version 2 (2 step(s) applied)",
        *["ledger at version 2 (up to date)"] * 4,
        "login_failures at version 1 (1 step(s) applied)",
        *["login_failures at version 1 (up to date)"] * 4,
        "payments at version 1 (1 step(s) applied)",
        *["payments at version 1 (up to date)"] * 4,
        "purchase_replays at version 1 (1 step(s) applied)",
        *["purchase_replays at version 1 (up to date)"] * 4,
    ]
    assert await fetch(pg_url, "SELECT component, version FROM schema_version ORDER BY 1") == [
        ("audit", 1),
        ("change_feed", 1),
        ("change_feed", 2),
        ("events", 1),
        ("give_backs", 1),
        ("ledger", 1),
        ("ledger", 2),
        ("login_failures", 1),
        ("payments", 1),
        ("purchase_replays", 1),
    ]


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_unreachable_database_is_one_line_and_exit_2_without_the_password(
    command: str, tmp_path: Path
) -> None:
    url = "postgresql://agent:hunter2-secret@127.0.0.1:1/billing"
    extra = ["--data-dir", str(tmp_path), "--port", "0"] if command == "serve" else []
    result = subprocess.run(
        [sys.executable, "-m", "ciris_billing_proxy", command, "--database-url", url, *extra],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ciris-billing-proxy: cannot use PostgreSQL agent@127.0.0.1:1/billing: ")
    assert result.stderr.count("\n") == 1
    assert "hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://agent:hunter2@db/billing", "must start with postgresql://"),
        ("postgresql://agent:hunter2@db:99999/billing", "not a valid PostgreSQL URL"),
        ("postgresql://agent:hunter2@db/", "must name one database"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_bad_database_url_is_one_line_and_exit_2(
    command: str, url: str, words: str, tmp_path: Path
) -> None:
    extra = ["--data-dir", str(tmp_path)] if command == "serve" else []
    result = subprocess.run(
        [sys.executable, "-m", "ciris_billing_proxy", command, "--database-url", url, *extra],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("ciris-billing-proxy: Invalid configuration: database_url: ")
    assert words in result.stderr
    assert result.stderr.count("\n") == 1
    assert "hunter2" not in result.stderr


async def test_two_serve_processes_never_take_more_than_200_weighted_spends_may(
    pg_url: str, tmp_path: Path
) -> None:
    """200 interactions costing 1 to 5, sent at once to two processes: the successes together take
    exactly what the ledger took from the grants (signup, an expiring promotion, paid credit), never
    more than there was."""
    env = clean_env(CIRIS_JWT_SECRET=SECRET)
    users = ["--user", "ann:pw", "--user", "root:pw:root@example.com:admin"]
    args = ["--database-url", pg_url, "--provider-option", "free_uses=150", *users]
    with serve(args, tmp_path / "one", env) as one, serve(args, tmp_path / "two", env) as two:
        async with aiohttp.ClientSession() as session:
            ann = {"Authorization": f"Bearer {await login(session, one.url, 'ann', 'pw')}"}
            root = {"Authorization": f"Bearer {await login(session, two.url, 'root', 'pw')}"}
            grants = f"{one.url}/v1/api/billing/admin/users/ann/grants"
            for grant in (
                {"amount": 100, "kind": "promotional", "reason": "promotion", "expires_at": "2099-01-01"},
                {"amount": 50, "kind": "paid", "reason": "purchase"},
            ):
                async with session.post(grants, json=grant, headers=root) as r:
                    assert r.status == 200, await r.text()

            async def interact(n: int) -> int:
                cost = 1 + n % 5
                url = (one, two)[n % 2].url
                async with session.post(
                    f"{url}/v1/agent/interact", params={"cost": str(cost)}, json={"message": "x"}, headers=ann
                ) as r:
                    assert r.status in (200, 402), await r.text()
                    return cost if r.status == 200 else 0

            taken = sum(await asyncio.gather(*(interact(n) for n in range(200))))
            assert 300 - 5 < taken <= 300  # 600 asked: at most a cost of 5 left unspent
            async with session.get(f"{two.url}/v1/api/billing/credits", headers=ann) as r:
                credits = await r.json()
            assert credits["credits_remaining"] + credits["free_uses_remaining"] == 300 - taken
            assert credits["total_uses"] == taken
    assert await fetch(pg_url, "SELECT used FROM credit_accounts WHERE user_id = 'ann'") == [(taken,)]
    assert await fetch(pg_url, "SELECT SUM(remaining) FROM credit_grants WHERE user_id = 'ann'") == [
        (300 - taken,)
    ]
    spent = "SELECT SUM(cost) FROM credit_entries WHERE user_id = 'ann' AND state = 'spent'"
    assert await fetch(pg_url, spent) == [(taken,)]
