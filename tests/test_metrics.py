"""Prometheus metrics (`ciris_billing_proxy.ops.metrics`): names and values after real traffic, in
one process (read at scrape time) and over `serve --workers 2` and gunicorn (prometheus-client's
multiprocess mode), where one scrape must report every worker's requests."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ciris_billing_proxy import BillingConfig, add_metrics_route, metrics_text, setup_billing
from ciris_billing_proxy.ops.metrics import BillingCollector
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.users import UserStore

from .ciris_helpers import INTERACT, agent_routes
from .conftest import SECRET, ClientFactory, make_config
from .default_paths import CREDITS, GOOGLE_PLAY, INITIATE, LOGIN
from .postgres import fresh_database
from .serving import clean_env, serve
from .test_workers import gunicorn, until_workers_listen, workers_of

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample as (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def host(app: web.Application) -> None:
    agent_routes(app)
    add_metrics_route(app)


async def scrape(client: Any) -> Samples:
    reply = await client.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=")
    return parse(await reply.text())


async def test_one_process_counts_requests_cache_spends_and_provider_calls(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, host=host)
    auth = tokens.headers("zoe")
    for _ in range(3):
        assert (await client.get(CREDITS, headers=auth)).status == 200
    assert (await client.get(CREDITS)).status == 401
    for fail in (False, False, True):
        await client.post(INTERACT, json={"fail": fail}, headers=auth)
    samples = await scrape(client)
    credits = {"method": "GET", "route": CREDITS}
    assert value(samples, "ciris_billing_requests_total", **credits, status="200") == 3
    assert value(samples, "ciris_billing_requests_total", **credits, status="401") == 1
    gated = {"method": "POST", "route": INTERACT}
    assert value(samples, "ciris_billing_requests_total", **gated, status="200") == 2
    assert value(samples, "ciris_billing_requests_total", **gated, status="502") == 1
    # The first lookup loads; each spend or give-back drops the user's entry, and the gate's
    # own credit reads go through the cache too.
    hits = value(samples, "ciris_billing_credit_cache_hits_total")
    misses = value(samples, "ciris_billing_credit_cache_misses_total")
    assert misses >= 1
    assert hits >= 2
    loads = value(
        samples, "ciris_billing_provider_call_duration_seconds_count", method="credit_status", outcome="ok"
    )
    assert loads == misses
    assert value(samples, "ciris_billing_spends_total", outcome="ok") == 3
    assert value(samples, "ciris_billing_give_backs_total", outcome="ok") == 1
    spend = {"method": "spend", "outcome": "ok"}
    assert value(samples, "ciris_billing_provider_call_duration_seconds_count", **spend) == 3
    assert value(samples, "ciris_billing_provider_call_duration_seconds_bucket", **spend, le="+Inf") == 3
    assert value(samples, "ciris_billing_provider_call_duration_seconds_sum", **spend) > 0
    assert value(samples, "ciris_billing_give_backs_owed") == 0
    assert value(samples, "ciris_billing_change_feed_up") == 1
    assert 0 <= value(samples, "ciris_billing_change_feed_lag_seconds") < 5
    assert ("ciris_billing_database_connections_in_use", ()) in samples
    # No user id, token or raw path in any label.
    assert "zoe" not in str(samples)


async def test_spends_without_credit_and_login_failures_and_lockouts_are_counted(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(tmp_path, provider_options={"free_uses": 1}, login_max_failures_per_user=2)
    users = UserStore()
    users.add("ann", "right-password")
    client = await make_client(config, host=host, authenticate=users.verify_login)
    auth = TokenFactory(config).headers("ann")
    statuses = [(await client.post(INTERACT, json={}, headers=auth)).status for _ in range(3)]
    assert statuses == [200, 402, 402]
    for _ in range(3):
        await client.post(LOGIN, json={"username": "ann", "password": "wrong"})
    samples = await scrape(client)
    assert value(samples, "ciris_billing_spends_total", outcome="ok") == 1
    assert value(samples, "ciris_billing_spends_total", outcome="insufficient_credit") == 2
    assert value(samples, "ciris_billing_requests_total", method="POST", route=INTERACT, status="402") == 2
    assert value(samples, "ciris_billing_login_failures_total") == 2
    assert value(samples, "ciris_billing_login_lockouts_total") == 1
    assert value(samples, "ciris_billing_requests_total", method="*", route=LOGIN, status="429") == 1
    assert "right-password" not in str(samples)
    assert "wrong" not in str(samples)


async def test_store_verifications_and_purchases_are_counted_by_outcome(
    make_client: ClientFactory, ciris_billing_config: BillingConfig, ciris_tokens: TokenFactory
) -> None:
    client = await make_client(ciris_billing_config, host=host)
    auth = ciris_tokens.headers("zoe", email="zoe@example.com")
    purchase = {
        "purchase_token": "valid-token-123456",
        "product_id": "credits_100",
        "package_name": "ai.ciris",
    }
    for token in ("valid-token-123456", "valid-token-123456", "invalid-token-123"):
        reply = await client.post(GOOGLE_PLAY, json={**purchase, "purchase_token": token}, headers=auth)
        assert reply.status == 200
    assert (await client.post(INITIATE, json={}, headers=auth)).status == 200
    samples = await scrape(client)
    google = {"store": "google_play"}
    assert value(samples, "ciris_billing_store_verifications_total", **google, outcome="credited") == 1
    assert (
        value(samples, "ciris_billing_store_verifications_total", **google, outcome="already_processed") == 1
    )
    assert value(samples, "ciris_billing_store_verifications_total", **google, outcome="refused") == 1
    assert value(samples, "ciris_billing_purchases_total", outcome="ok") == 1


async def test_a_host_registers_the_collector_in_its_own_registry(
    config: BillingConfig, tokens: TokenFactory
) -> None:
    app = web.Application()
    billing = setup_billing(app, config, environ={})
    async with TestClient(TestServer(app)) as served:
        assert (await served.get(CREDITS, headers=tokens.headers("zoe"))).status == 200
        registry = CollectorRegistry()
        registry.register(BillingCollector(billing))
        samples = parse(generate_latest(registry).decode())
        assert value(samples, "ciris_billing_requests_total", method="GET", route=CREDITS, status="200") == 1
        # The same metrics as the route serves (the feed's lag moves between the two reads).
        assert parse(metrics_text(billing).decode()).keys() == samples.keys()


async def wait_for(check: Any, url: str, seconds: float = 20.0) -> Samples:
    """The scrape of `url` once `check(samples)` holds."""
    samples: Samples = {}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(f"{url}/metrics") as reply:
                samples = parse(await reply.text())
            if check(samples):
                return samples
            await asyncio.sleep(0.2)
    raise AssertionError(f"the scrape never matched: {sorted(k for k in samples if 'requests' in k[0])}")


async def traffic(url: str, token: str, credits: int, interacts: int) -> None:
    """Requests on connections of their own, so the kernel spreads them over the workers."""
    headers = {"Authorization": f"Bearer {token}"}

    async def one(method: str, path: str) -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(method, f"{url}{path}", headers=headers, json={"message": "hi"}) as r,
        ):
            assert r.status == 200, await r.text()

    await asyncio.gather(
        *(one("GET", CREDITS) for _ in range(credits)), *(one("POST", INTERACT) for _ in range(interacts))
    )


def serve_totals(samples: Samples) -> tuple[float, float, float]:
    return (
        value(samples, "ciris_billing_requests_total", method="GET", route=CREDITS, status="200"),
        value(samples, "ciris_billing_requests_total", method="POST", route=INTERACT, status="200"),
        value(samples, "ciris_billing_spends_total", outcome="ok"),
    )


async def test_one_scrape_of_serve_workers_reports_every_worker(tmp_path: Path) -> None:
    env = clean_env(
        CIRIS_JWT_SECRET=SECRET, CIRIS_BILLING_USERS="ann:pw-for-ann", CIRIS_SIMPLE_FREE_USES="1000"
    )
    with serve(["--workers", "2"], tmp_path, env) as server:
        pids = workers_of(server.process.pid)
        assert len(pids) == 2
        async with aiohttp.ClientSession() as session:
            reply = await session.post(
                f"{server.url}{LOGIN}", json={"username": "ann", "password": "pw-for-ann"}
            )
            token = (await reply.json())["access_token"]
        await traffic(server.url, token, credits=40, interacts=30)
        samples = await wait_for(lambda s: serve_totals(s) == (40, 30, 30), server.url)
        assert (
            value(samples, "ciris_billing_provider_call_duration_seconds_count", method="spend", outcome="ok")
            == 30
        )
        assert value(samples, "ciris_billing_change_feed_up") == 1
        assert value(samples, "ciris_billing_give_backs_owed") == 0
        assert value(samples, "ciris_billing_requests_total", method="*", route=LOGIN, status="200") == 1

        # Each worker writes files of its own in serve's directory; the scrape merged them.
        metrics_dir = metrics_dir_of(pids[0])
        assert metrics_dir == metrics_dir_of(pids[1])
        # Every worker writes its own files (one took no traffic: gunicorn lets the first to wake
        # accept), and the scrape merged them.
        for _ in range(100):
            if len(list(metrics_dir.glob("counter_*.db"))) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(list(metrics_dir.glob("counter_*.db"))) == 2

        # A killed worker is replaced; what it counted stays counted.
        os.kill(pids[0], signal.SIGKILL)
        for _ in range(100):
            if len(workers_of(server.process.pid)) == 2 and pids[0] not in workers_of(server.process.pid):
                break
            await asyncio.sleep(0.1)
        await traffic(server.url, token, credits=10, interacts=0)
        await wait_for(lambda s: serve_totals(s) == (50, 30, 30), server.url)
    assert not metrics_dir.exists(), "serve removes its metrics directory at exit"
    assert "Traceback" not in "".join(server.output)


def metrics_dir_of(pid: int) -> Path:
    """The directory of the multiprocess files a worker has mapped."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "/ciris-billing-metrics-" in line:
            return Path(line.split(maxsplit=5)[5]).parent
    raise AssertionError(f"worker {pid} has no metrics file mapped")


async def test_one_scrape_of_gunicorn_reports_every_worker(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = clean_env(
        CIRIS_JWT_SECRET=SECRET,
        CIRIS_BILLING_DATA_DIR=str(tmp_path),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    env["CIRIS_SIMPLE_FREE_USES"] = "100"
    with gunicorn(env) as (process, url):
        await until_workers_listen(process.pid, url)
        token = TokenFactory(BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET})).token("ann")
        await traffic(url, token, credits=20, interacts=10)
        await wait_for(lambda s: serve_totals(s) == (20, 10, 10), url)
        # Every worker writes files of its own (one may have had no traffic: under gunicorn the
        # first to wake accepts), and the scrape merged them.
        for _ in range(100):
            if len(list(metrics_dir.glob("counter_*.db"))) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(list(metrics_dir.glob("counter_*.db"))) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


async def test_connections_in_use_count_every_pool_of_the_process_the_providers_included(
    tmp_path: Path, tokens: TokenFactory
) -> None:
    async with fresh_database() as url:
        config = make_config(tmp_path, database_url=url, provider_options={}, database_pool_size=2)
        app = web.Application()
        billing = setup_billing(app, config, environ={})
        async with TestClient(TestServer(app)) as served:
            assert (await served.get(CREDITS, headers=tokens.headers("zoe"))).status == 200
            engine = billing.provider.ledger.engine  # type: ignore[attr-defined]
            # Both connections of the simple provider's own pool, which the change feed's pool (all
            # the gauge used to count) does not include. Other pools (the feed, the outbox, the
            # audit trail) may lend one out in the background meanwhile: at least, not exactly.
            async with engine.connection(), engine.connection():
                held = parse(metrics_text(billing).decode())
                assert engine.connections_in_use() == 2
            assert engine.connections_in_use() == 0
        assert value(held, "ciris_billing_database_connections_in_use") >= 2
