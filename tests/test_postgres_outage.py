"""Faults of the PostgreSQL store. Unreachable at startup: a clear exception. Going away while
serving: 503 JSON on the routes and the gate, nothing granted that
was not recorded, and service back without a restart once the database is (through a TCP proxy the
test cuts and restores)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

from ciris_billing_proxy import DatabaseUnavailable, setup_billing
from ciris_billing_proxy.testing import TokenFactory

from .ciris_helpers import INTERACT, agent_routes
from .conftest import ClientFactory, make_config
from .default_paths import CREDITS, TRANSACTIONS
from .postgres import TcpProxy, fetch


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[TcpProxy]:
    target = URL(pg_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.cut()


async def test_an_outage_is_503_json_and_service_resumes_without_a_restart(
    pg_url: str, proxy: TcpProxy, make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, database_url=proxy.url_for(pg_url), provider_options={"free_uses": 10})
    client = await make_client(config, host=agent_routes)
    headers = TokenFactory(config).headers("alice")
    for _ in range(3):
        assert (await client.post(INTERACT, json={}, headers=headers)).status == 200

    await proxy.cut()
    gated = await client.post(INTERACT, json={}, headers=headers)
    assert gated.status == 503
    assert await gated.json() == {"detail": "Credit provider unavailable"}
    for path in (CREDITS, TRANSACTIONS):
        reply = await client.get(path, headers=headers)
        assert reply.status == 503
        assert await reply.json() == {"detail": "Billing service unavailable"}
    assert await fetch(pg_url, "SELECT used FROM credit_accounts") == [(3,)]
    for _ in range(20):
        assert (await client.post(INTERACT, json={}, headers=headers)).status == 503
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("ciris_billing_proxy")]
    # One line for the outage, however many requests meet it (the count follows after 10 s).
    assert len([line for line in logged if line.startswith("PostgreSQL unavailable: ")]) == 1
    assert not [line for line in logged if str(proxy.port) in line or URL(pg_url).path in line]

    await proxy.restore()
    assert (await client.post(INTERACT, json={}, headers=headers)).status == 200
    credits = await (await client.get(CREDITS, headers=headers)).json()
    assert (credits["total_uses"], credits["free_uses_remaining"]) == (4, 6)
    assert await fetch(pg_url, "SELECT used FROM credit_accounts") == [(4,)]


async def test_an_unreachable_database_stops_the_app_startup_with_a_clear_exception(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, database_url="postgresql://agent:hunter2@127.0.0.1:1/billing", provider_options={}
    )
    app = web.Application()
    setup_billing(app, config, environ={})
    runner = web.AppRunner(app)
    with pytest.raises(DatabaseUnavailable) as raised:
        await runner.setup()
    assert str(raised.value).startswith("cannot use PostgreSQL agent@127.0.0.1:1/billing: ")
    assert "hunter2" not in str(raised.value)


async def test_a_cut_during_concurrent_spends_leaves_exactly_the_granted_uses_recorded(
    pg_url: str, proxy: TcpProxy, make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        database_url=proxy.url_for(pg_url),
        provider_options={"free_uses": 1000},
        give_back_retry_max_seconds=0.2,
    )
    client = await make_client(config, host=agent_routes)
    headers = TokenFactory(config).headers("alice")
    answered: list[object] = []
    fifth = asyncio.Event()

    def count(task: object) -> None:
        answered.append(task)
        if len(answered) == 20:
            fifth.set()

    requests = [asyncio.ensure_future(client.post(INTERACT, json={}, headers=headers)) for _ in range(100)]
    for request in requests:
        request.add_done_callback(count)
    await fifth.wait()  # cut with a fifth answered and the rest in flight
    await proxy.cut()
    statuses = [r.status for r in await asyncio.gather(*requests)]
    await proxy.restore()
    assert set(statuses) <= {200, 503}
    granted = statuses.count(200)
    # A spend committed just before the cut but answered 503 is given back once the database is back.
    deadline = asyncio.get_running_loop().time() + 10
    while await fetch(pg_url, "SELECT COALESCE(SUM(used), 0) FROM credit_accounts") != [(granted,)]:
        assert asyncio.get_running_loop().time() < deadline, (granted, statuses.count(503))
        await asyncio.sleep(0.05)
