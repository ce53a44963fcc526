"""Database budgets (`database_pool_size`, `database_timeout_seconds`): a PostgreSQL server that
stops answering without closing anything (a TCP proxy that keeps its connections but forwards
nothing) costs a request at most the budget, answered 503 JSON, and a SIGTERM still stops `serve`;
the ledger stays exact once the server answers again."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.store import PostgresDatabase
from ciris_billing_proxy.testing import TokenFactory

from .ciris_helpers import INTERACT, agent_routes
from .conftest import SECRET, ClientFactory, make_config
from .default_paths import CREDITS
from .postgres import TcpProxy, fetch
from .serving import clean_env, login, serve

#: Far above the 1 s budget the tests set, far below what a stall cost before (10 s per statement).
HANG = aiohttp.ClientTimeout(total=8)


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[TcpProxy]:
    target = URL(pg_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    yield proxy
    proxy.resume()
    await proxy.cut()


def test_the_budget_reaches_every_postgresql_engine(tmp_path: Path) -> None:
    config = BillingConfig.from_env(
        {
            "CIRIS_JWT_SECRET": SECRET,
            "CIRIS_BILLING_DATABASE_URL": "postgresql://agent@127.0.0.1:1/billing",
            "CIRIS_BILLING_DATABASE_POOL_SIZE": "3",
            "CIRIS_BILLING_DATABASE_TIMEOUT_SECONDS": "2.5",
        },
        data_dir=tmp_path,
    )
    assert (config.database_pool_size, config.database_timeout_seconds) == (3, 2.5)
    from ciris_billing_proxy.setup import provider_context

    engine = provider_context(config, {}).database("unused.sqlite3")
    assert isinstance(engine, PostgresDatabase)
    assert (engine.max_size, engine.timeout) == (3, 2.5)


async def test_a_stalled_database_costs_a_request_its_budget_then_503_and_the_ledger_stays_exact(
    pg_url: str, proxy: TcpProxy, make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        database_url=proxy.url_for(pg_url),
        provider_options={"free_uses": 1000},
        database_pool_size=4,
        database_timeout_seconds=1.0,
        give_back_retry_max_seconds=0.2,
    )
    client = await make_client(config, host=agent_routes)
    tokens = TokenFactory(config)
    assert (await client.post(INTERACT, json={}, headers=tokens.headers("ann"))).status == 200

    proxy.stall()

    async def gated() -> int:
        reply = await client.post(INTERACT, json={}, headers=tokens.headers("ann"), timeout=HANG)
        if reply.status == 503:
            assert await reply.json() == {"detail": "Credit provider unavailable"}
        return reply.status

    async def read(user: str) -> int:
        reply = await client.get(CREDITS, headers=tokens.headers(user), timeout=HANG)
        assert await reply.json() == {"detail": "Billing service unavailable"}
        return reply.status

    statuses = await asyncio.gather(*(gated() for _ in range(16)), *(read(f"new{n}") for n in range(4)))
    assert statuses == [503] * 20

    proxy.resume()
    assert (await client.post(INTERACT, json={}, headers=tokens.headers("ann"))).status == 200
    # Spends held by the stall may land once it ends: each is given back (they answered 503).
    deadline = asyncio.get_running_loop().time() + 20
    used = "SELECT used FROM credit_accounts"
    while await fetch(pg_url, used) != [(2,)]:
        assert asyncio.get_running_loop().time() < deadline, await fetch(pg_url, used)
        await asyncio.sleep(0.1)


async def test_a_sigterm_while_the_database_is_stalled_still_stops_serve(
    pg_url: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    env = clean_env(
        CIRIS_JWT_SECRET=SECRET,
        CIRIS_BILLING_DATABASE_TIMEOUT_SECONDS="1",
        CIRIS_GIVE_BACK_RETRY_MAX_SECONDS="0.2",
    )
    args = [
        "--database-url",
        proxy.url_for(pg_url),
        "--provider-option",
        "free_uses=1000",
        "--user",
        "ann:pw",
    ]
    running = serve(args, tmp_path, env)
    server = await asyncio.to_thread(running.__enter__)
    try:
        async with aiohttp.ClientSession(timeout=HANG) as session:
            auth = {"Authorization": f"Bearer {await login(session, server.url, 'ann', 'pw')}"}

            async def interact() -> int:
                body = json.dumps({"message": "hi"})
                async with session.post(f"{server.url}{INTERACT}", data=body, headers=auth) as reply:
                    return reply.status

            assert await interact() == 200
            proxy.stall()
            in_flight = [asyncio.ensure_future(interact()) for _ in range(8)]
            await asyncio.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            # The hang detector of `serve`'s own shutdown: it stops by itself, well before being killed.
            code = await asyncio.to_thread(server.process.wait, 30)
            await asyncio.gather(*in_flight, return_exceptions=True)
        assert code == 0, "".join(server.output)
    finally:
        await asyncio.to_thread(running.__exit__, None, None, None)
    output = "".join(server.output)
    assert "Traceback" not in output, output
