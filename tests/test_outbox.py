"""Give-backs that survive a restart (`ops/outbox.py`): a real `serve` stopped by SIGTERM in the
middle of a real database outage, with many failing interactions of one user in flight, then the
database restored and `serve` started again: every failed interaction's use comes back, exactly.
On PostgreSQL the outage is a cut through a TCP proxy; on SQLite another connection holds the
write lock."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from ciris_billing_proxy.ops.spool import SPOOL_FILE

from .conftest import SECRET
from .postgres import TcpProxy, fetch
from .serving import Server, clean_env, login, serve

INTERACT = "/v1/agent/interact"
FAILING = 24  # failing interactions in flight when the database goes
DURING = 6  # interactions started during the outage


@asynccontextmanager
async def served(args: list[str], data_dir: Path, env: dict[str, str]) -> AsyncIterator[Server]:
    """`serve` started off the event loop: the TCP proxy it connects through runs on this loop."""
    running = serve(args, data_dir, env)
    server = await asyncio.to_thread(running.__enter__)
    try:
        yield server
    finally:
        await asyncio.to_thread(running.__exit__, None, None, None)


async def stop(server: Server, how: signal.Signals) -> int:
    """Stop `serve` as an orchestrator does (SIGTERM: it must stop by itself), or kill it."""
    server.process.send_signal(how)
    return await asyncio.to_thread(server.process.wait, 20)


async def until_used(used: Callable[[], Awaitable[int]], expected: int, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.1)):
        await asyncio.sleep(0.1)
        if await used() == expected:
            return
    raise AssertionError(f"{await used()} uses spent, not {expected}")


async def outage_then_restart(
    args: list[str],
    data_dir: Path,
    used: Callable[[], Awaitable[int]],
    fail: Callable[[], Awaitable[None]],
    restore: Callable[[], Awaitable[None]],
    how: signal.Signals = signal.SIGTERM,
) -> Path:
    """Three good interactions, then FAILING interactions whose uses are taken before the outage
    and whose bodies (malformed: 400, so their use is owed back) arrive during it, and DURING more
    started in it; SIGTERM (or `how`); restore; `serve` again. Returns the spool's path."""
    env = clean_env(
        CIRIS_JWT_SECRET=SECRET,
        CIRIS_GIVE_BACK_RETRY_MAX_SECONDS="0.2",
        CIRIS_BILLING_DATABASE_TIMEOUT_SECONDS="1",
    )
    release = asyncio.Event()

    async def late_body() -> AsyncIterator[bytes]:
        yield b"{"  # the client sends the request head with the first chunk
        await release.wait()
        yield b"not json"

    async with served(args, data_dir, env) as first, aiohttp.ClientSession() as session:
        auth = {"Authorization": f"Bearer {await login(session, first.url, 'ann', 'pw')}"}

        async def interact(body: object) -> int:
            async with session.post(f"{first.url}{INTERACT}", data=body, headers=auth) as reply:
                await reply.read()
                return reply.status

        for _ in range(3):
            assert await interact(json.dumps({"message": "hi"})) == 200
        failing = [asyncio.ensure_future(interact(late_body())) for _ in range(FAILING)]
        await until_used(used, 3 + FAILING)
        await fail()
        release.set()
        statuses = await asyncio.gather(*failing)
        during = await asyncio.gather(*(interact(json.dumps({"message": "x"})) for _ in range(DURING)))
        assert statuses == [400] * FAILING
        assert set(during) <= {503, 400}, during
        assert await stop(first, how) == (0 if how == signal.SIGTERM else -how), "".join(first.output)
    assert await used() == 3 + FAILING  # nothing was given back during the outage

    await restore()
    async with served(args, data_dir, env):
        await until_used(used, 3)
    assert await used() == 3
    return data_dir / SPOOL_FILE


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[TcpProxy]:
    target = URL(pg_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.cut()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
async def test_a_sigterm_during_a_postgres_outage_loses_no_give_back(
    pg_url: str, proxy: TcpProxy, tmp_path: Path, how: signal.Signals
) -> None:
    """Also `kill -9`: once a failed interaction was answered, its give-back was already recorded."""
    args = [
        "--database-url",
        proxy.url_for(pg_url),
        "--provider-option",
        "free_uses=1000",
        "--user",
        "ann:pw",
    ]

    async def used() -> int:
        rows = await fetch(pg_url, "SELECT COALESCE(SUM(used), 0) FROM credit_accounts")
        return int(str(rows[0][0]))

    spool = await outage_then_restart(args, tmp_path / "data", used, proxy.cut, proxy.restore, how)
    # The owed give-backs went through the spool (the store was cut too), and left it once made.
    assert spool.exists()
    assert spool.read_bytes() == b""
    assert await fetch(pg_url, "SELECT count(*) FROM give_backs") == [(0,)]


#: Holds the write lock of the SQLite file argv[1] until stdin closes.
HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("layout", ["one-file", "data-dir"])
async def test_a_sigterm_while_sqlite_is_locked_loses_no_give_back(layout: str, tmp_path: Path) -> None:
    """`one-file`: everything in one `database_url` file, so the outbox's store is locked too and
    the spool keeps the give-backs; `data-dir`: the ledger's file is locked, the outbox's is not."""
    data_dir = tmp_path / "data"
    args = ["--provider-option", "free_uses=1000", "--user", "ann:pw"]
    if layout == "one-file":
        ledger = tmp_path / "billing.sqlite3"
        args += ["--database-url", f"sqlite:///{ledger}"]
    else:
        ledger = data_dir / "simple-usage.sqlite3"

    async def used() -> int:
        if not ledger.exists():
            return 0
        reader = sqlite3.connect(ledger)
        try:
            return int(reader.execute("SELECT COALESCE(SUM(used), 0) FROM credit_accounts").fetchone()[0])
        except sqlite3.OperationalError:  # no table yet
            return 0
        finally:
            reader.close()

    holders: list[asyncio.subprocess.Process] = []

    async def lock() -> None:
        # Another process, as an operator's tool or a backup would be.
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD_WRITE_LOCK, str(ledger), stdin=PIPE, stdout=PIPE
        )
        holders.append(holder)
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"locked\n"

    async def unlock() -> None:
        await holders.pop().communicate(b"")

    try:
        spool = await outage_then_restart(args, data_dir, used, lock, unlock)
    finally:
        for holder in holders:
            holder.kill()
            await holder.wait()
    assert spool.exists() == (layout == "one-file")
