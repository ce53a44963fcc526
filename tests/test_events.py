"""Billing events (`ciris_billing_proxy.events`): kept in the outbox until delivered, to the host's
callback and as signed webhooks to a real receiver on loopback, at least once across receiver
outages and restarts of the delivering app, never twice at once from two processes."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, BillingService, ConfigError, setup_billing
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.events import Event, SignatureVerificationError, sign, verify_signature
from ciris_billing_proxy.events.delivery import retry_delay
from ciris_billing_proxy.ops.metrics import metrics_text
from ciris_billing_proxy.store import Engine, PostgresDatabase, SQLiteDatabase
from ciris_billing_proxy.store.events import add_postgres, add_sqlite, event_store
from ciris_billing_proxy.testing import TokenFactory

from .conftest import make_config
from .event_receiver import Receiver
from .providers import ShopProvider

HOOK_SECRET = "whsec-test-0123456789abcdef-events"
LEDGER = "ledger.sqlite3"


def events_config(tmp_path: Path, receiver: Receiver | None = None, **overrides: Any) -> BillingConfig:
    """The `simple` provider on a file its events are written to, webhooks to `receiver`."""
    hooks: dict[str, Any] = {}
    if receiver is not None:
        hooks = {"events_url": receiver.url, "events_secret": HOOK_SECRET}
    overrides.setdefault("provider_options", {"database": str(tmp_path / LEDGER)})
    overrides.setdefault("events_retry_max_seconds", 0.4)
    return make_config(tmp_path, **hooks, **overrides)


@asynccontextmanager
async def billing_app(
    config: BillingConfig, on_event: Callable[[Event], Awaitable[None]] | None = None
) -> AsyncIterator[BillingService]:
    """An app with billing set up, started and (at the end) cleaned up as a server does."""
    app = web.Application()
    service = setup_billing(app, config, environ={}, on_event=on_event)
    assert service.events is not None
    service.events.delivery.first_retry = 0.05
    service.events.delivery.poll = 0.1
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        yield service
    finally:
        await runner.cleanup()


def write_events(path: Path, count: int, first: int = 0) -> list[str]:
    """Events written as the grants ledger writes them, in a transaction of another connection."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        ids = [
            add_sqlite(conn, "credit.granted", "local", f"user-{n % 7}", {"amount": n, "grant_id": f"g{n}"})
            for n in range(first, first + count)
        ]
        conn.execute("COMMIT")
    finally:
        conn.close()
    return ids


async def until(check: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not within the time allowed")
        await asyncio.sleep(0.02)


# -- signatures --------------------------------------------------------------------------------------


def test_a_signature_verifies_and_forgeries_do_not() -> None:
    body = b'{"id":"evt_1","type":"balance.low"}'
    header = sign(body, HOOK_SECRET)
    assert verify_signature(body, header, HOOK_SECRET) == int(header.split(",")[0][2:])
    bad = {
        "another body": (body + b" ", header, HOOK_SECRET),
        "another secret": (body, header, HOOK_SECRET + "x"),
        "no header": (body, None, HOOK_SECRET),
        "empty header": (body, "", HOOK_SECRET),
        "no v1": (body, header.split(",")[0], HOOK_SECRET),
        "no timestamp": (body, header.split(",")[1], HOOK_SECRET),
        "bad timestamp": (body, "t=soon," + header.split(",")[1], HOOK_SECRET),
        "timestamp moved": (body, f"t={int(time.time()) + 1}," + header.split(",")[1], HOOK_SECRET),
        "stale": (body, sign(body, HOOK_SECRET, int(time.time()) - 301), HOOK_SECRET),
        "from the future": (body, sign(body, HOOK_SECRET, int(time.time()) + 301), HOOK_SECRET),
    }
    for why, (payload, signature, secret) in bad.items():
        with pytest.raises(SignatureVerificationError):
            verify_signature(payload, signature, secret)
        assert why
    # A stale one passes a wider tolerance; a sender rolling its secret signs twice.
    old = sign(body, HOOK_SECRET, int(time.time()) - 301)
    assert verify_signature(body, old, HOOK_SECRET, tolerance=400)
    rolled = sign(body, "old-secret-0123456789") + "," + sign(body, HOOK_SECRET).split(",")[1]
    assert verify_signature(body, rolled, HOOK_SECRET)


def test_retries_back_off_exponentially_up_to_the_cap() -> None:
    lowest = [retry_delay(n, cap=30.0, first=1.0, rand=lambda: 0.0) for n in range(1, 9)]
    highest = [retry_delay(n, cap=30.0, first=1.0, rand=lambda: 1.0) for n in range(1, 9)]
    assert highest == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert lowest == [h / 2 for h in highest]  # the jitter: the upper half is random
    assert retry_delay(10_000, cap=600.0) <= 600.0


def test_config_needs_a_secret_for_the_url_and_never_shows_it(tmp_path: Path) -> None:
    for bad in (
        {"events_url": "https://hooks.example/billing"},
        {"events_url": "https://hooks.example/billing", "events_secret": "short"},
        {"events_url": "ftp://hooks.example/billing", "events_secret": HOOK_SECRET},
        {"events_url": "https:///billing", "events_secret": HOOK_SECRET},
    ):
        with pytest.raises(ValueError, match="events_") as caught:
            make_config(tmp_path, **bad)
        assert HOOK_SECRET not in str(caught.value)
    env = {
        "CIRIS_JWT_SECRET": "x" * 48,
        "CIRIS_BILLING_EVENTS_URL": "https://hooks.example/billing?token=query-secret",
        "CIRIS_BILLING_EVENTS_SECRET": HOOK_SECRET,
        "CIRIS_BILLING_EVENTS_RETRY_MAX_SECONDS": "30",
    }
    config = BillingConfig.from_env(env)
    assert config.events_url == env["CIRIS_BILLING_EVENTS_URL"]
    assert config.events_retry_max_seconds == 30
    assert HOOK_SECRET not in repr(config)
    assert HOOK_SECRET not in str(config.model_dump())
    with pytest.raises(ConfigError) as caught:
        BillingConfig.from_env({**env, "CIRIS_BILLING_EVENTS_URL": "mailto:query-secret@example"})
    assert "query-secret" not in str(caught.value)


# -- delivery ----------------------------------------------------------------------------------------


async def test_a_receiver_down_then_failing_and_a_restart_still_get_every_event_once(tmp_path: Path) -> None:
    receiver = Receiver(HOOK_SECRET)
    await receiver.start()
    await receiver.stop()  # its port now refuses connections
    config = events_config(tmp_path, receiver)
    written: list[str] = []
    async with billing_app(config) as service:
        written += write_events(tmp_path / LEDGER, 20)
        service.events.delivery.wake()  # type: ignore[union-attr]
        await until(lambda: service.events.delivery.counts.failed.get(("webhook", "connection"), 0) >= 20)  # type: ignore[union-attr]
    # Written while no process delivers: kept.
    written += write_events(tmp_path / LEDGER, 15, first=20)
    await receiver.start()
    try:
        receiver.mode = "fail"
        async with billing_app(config) as service:
            await until(lambda: len({a.event_id for a in receiver.attempts}) == 35)
            written += write_events(tmp_path / LEDGER, 5, first=35)
            await asyncio.sleep(0.3)
            receiver.mode = "ok"
            await until(lambda: set(receiver.ids()) == set(written))
            assert len(receiver.ids()) == len(written)  # once each: nothing is sent again once taken
            counts = service.events.delivery.counts  # type: ignore[union-attr]
            # The receiver records an attempt before it answers; the count follows the answer.
            await until(lambda: counts.delivered.get("webhook", 0) >= 40)
            assert counts.delivered == {"webhook": 40}
            assert counts.failed[("webhook", "status")] >= 35
        assert all(attempt.signed for attempt in receiver.attempts)
        by_id = {body["id"]: body for body in receiver.taken}
        first = by_id[written[3]]
        assert first["type"] == "credit.granted"
        assert (first["user_id"], first["namespace"]) == ("user-3", "local")
        assert first["data"] == {"amount": 3, "grant_id": "g3"}
        assert abs(first["created"] - time.time()) < 60
        rows = sqlite3.connect(tmp_path / LEDGER).execute(
            "SELECT COUNT(*) FROM billing_events WHERE delivered_at IS NULL"
        )
        assert rows.fetchone()[0] == 0
    finally:
        await receiver.stop()


async def test_a_stop_during_a_delivery_is_prompt_and_the_event_is_delivered_after_the_restart(
    tmp_path: Path,
) -> None:
    receiver = Receiver(HOOK_SECRET, mode="slow")
    await receiver.start()
    config = events_config(tmp_path, receiver)
    async with billing_app(config) as service:
        (event_id,) = write_events(tmp_path / LEDGER, 1)
        service.events.delivery.wake()  # type: ignore[union-attr]
        await until(lambda: receiver.arrived == 1)
        started = time.monotonic()
    assert time.monotonic() - started < 5  # the cleanup did not wait for the receiver
    receiver.mode = "ok"
    async with billing_app(config):
        # The stopped process gave its claim back: taken at once, not after the lease.
        await until(lambda: receiver.ids() == [event_id], seconds=5)
    await receiver.stop()


async def test_the_callback_gets_each_event_and_one_that_raises_gets_it_again(tmp_path: Path) -> None:
    seen: list[Event] = []
    refusals: dict[str, int] = {}

    async def on_event(event: Event) -> None:
        if refusals.get(event.id, 0) < 2:
            refusals[event.id] = refusals.get(event.id, 0) + 1
            raise RuntimeError("host database down")
        seen.append(event)

    config = events_config(tmp_path)
    async with billing_app(config, on_event) as service:
        written = write_events(tmp_path / LEDGER, 6)
        await until(lambda: len(seen) == 6)
        await asyncio.sleep(0.3)
        counts = service.events.delivery.counts  # type: ignore[union-attr]
        assert counts.failed == {("callback", "callback_error"): 12}
        assert counts.delivered == {"callback": 6}
        text = metrics_text(service).decode()
    assert sorted(event.id for event in seen) == sorted(written)
    event = next(e for e in seen if e.id == written[2])
    assert (event.kind, event.user_id, event.namespace) == ("credit.granted", "user-2", "local")
    assert event.data == {"amount": 2, "grant_id": "g2"}
    assert event.created_at.tzinfo is not None
    assert 'ciris_billing_events_delivered_total{sink="callback"} 6.0' in text
    assert 'ciris_billing_events_failed_total{reason="callback_error",sink="callback"} 12.0' in text


async def test_a_sink_that_took_an_event_is_not_sent_it_again_when_another_failed(tmp_path: Path) -> None:
    receiver = Receiver(HOOK_SECRET, mode="fail")
    await receiver.start()
    seen: list[str] = []

    async def on_event(event: Event) -> None:
        seen.append(event.id)

    async with billing_app(events_config(tmp_path, receiver), on_event):
        written = write_events(tmp_path / LEDGER, 3)
        await until(lambda: len(receiver.attempts) >= 9)
        receiver.mode = "ok"
        await until(lambda: sorted(receiver.ids()) == sorted(written))
    assert sorted(seen) == sorted(written)  # once each, though the webhook failed three times
    await receiver.stop()


async def test_retries_back_off(tmp_path: Path) -> None:
    receiver = Receiver(HOOK_SECRET, mode="fail")
    await receiver.start()
    config = events_config(tmp_path, receiver, events_retry_max_seconds=0.8)
    async with billing_app(config) as service:
        service.events.delivery.first_retry = 0.1  # type: ignore[union-attr]
        write_events(tmp_path / LEDGER, 1)
        await until(lambda: len(receiver.attempts) >= 7)
        text = metrics_text(service).decode()
    await receiver.stop()
    times = [a.at for a in receiver.attempts[:7]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Each wait is in the upper half of its doubling (0.05-0.1, 0.1-0.2, ...), capped at 0.8.
    for gap, ceiling in zip(gaps, (0.1, 0.2, 0.4, 0.8, 0.8, 0.8), strict=True):
        assert ceiling / 2 - 0.01 <= gap <= ceiling + 0.15, gaps
    assert gaps[3] > 3 * gaps[0]
    assert 'ciris_billing_events_failed_total{reason="status",sink="webhook"}' in text


async def test_secrets_and_the_url_never_reach_the_logs_or_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = Receiver(HOOK_SECRET, mode="fail")
    await receiver.start()
    config = events_config(tmp_path, receiver)
    async with billing_app(config) as service:
        write_events(tmp_path / LEDGER, 2)
        await until(lambda: len(receiver.attempts) >= 4)
        await receiver.stop()  # connection errors too
        await until(lambda: service.events.delivery.counts.failed.get(("webhook", "connection"), 0) >= 2)  # type: ignore[union-attr]
    stored = sqlite3.connect(tmp_path / LEDGER).execute("SELECT last_error FROM billing_events").fetchall()
    # Not the receiver's own access log: it is the receiver's to keep its URL out of.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("ciris_billing_proxy"))
    text = ours + json.dumps(stored)
    assert "Billing event delivery failed" in ours
    assert "HTTP 500" in text
    for secret in (HOOK_SECRET, "receiver-query-token-77", str(receiver.port)):
        assert secret not in text


async def test_two_apps_on_one_sqlite_file_never_deliver_an_event_twice(tmp_path: Path) -> None:
    receiver = Receiver(HOOK_SECRET)
    await receiver.start()
    config = events_config(tmp_path, receiver)
    async with billing_app(config) as first:
        written = write_events(tmp_path / LEDGER, 1)  # the table exists before the burst
        async with billing_app(config) as second:
            for batch in range(10):
                written += write_events(tmp_path / LEDGER, 30, first=1 + 30 * batch)
                first.events.delivery.wake()  # type: ignore[union-attr]
                second.events.delivery.wake()  # type: ignore[union-attr]
            await until(lambda: len(receiver.taken) >= len(written))
            await asyncio.sleep(0.3)
            by = [s.events.delivery.counts.delivered.get("webhook", 0) for s in (first, second)]  # type: ignore[union-attr]
    await receiver.stop()
    assert sorted(receiver.ids()) == sorted(written)  # each exactly once
    assert sum(by) == len(written)
    assert min(by) > 0, by  # both delivered


async def test_two_apps_on_postgresql_never_deliver_an_event_twice(tmp_path: Path, pg_url: str) -> None:
    import asyncpg

    receiver = Receiver(HOOK_SECRET)
    await receiver.start()
    config = events_config(tmp_path, receiver, database_url=pg_url, provider_options={}, database_pool_size=3)
    written: list[str] = []
    async with billing_app(config) as first, billing_app(config) as second:
        conn = await asyncpg.connect(pg_url)
        try:
            for n in range(300):
                async with conn.transaction():
                    written.append(await add_postgres(conn, "balance.low", "local", f"u{n % 5}", {"n": n}))
                if n % 30 == 0:
                    first.events.delivery.wake()  # type: ignore[union-attr]
                    second.events.delivery.wake()  # type: ignore[union-attr]
        finally:
            await conn.close()
        await until(lambda: len(receiver.taken) >= len(written))
        await asyncio.sleep(0.3)
        by = [s.events.delivery.counts.delivered.get("webhook", 0) for s in (first, second)]  # type: ignore[union-attr]
    await receiver.stop()
    assert sorted(receiver.ids()) == sorted(written)
    assert sum(by) == len(written)
    assert min(by) > 0, by


# -- purchase.succeeded, emitted by the service for a provider that writes no events ----------------


@asynccontextmanager
async def shop_servers(
    config: BillingConfig, on_event: Callable[[Event], Awaitable[None]]
) -> AsyncIterator[list[str]]:
    """Two apps (each its own `ShopProvider` knowing payment pi_1 of ann) served over loopback,
    sharing the config's store; their base URLs."""
    runners = []
    urls = []
    try:
        for _ in range(2):
            provider = ShopProvider()
            provider.payments["pi_1"] = (("local", "ann"), 20)
            app = web.Application()
            service = setup_billing(app, config, provider=provider, environ={}, on_event=on_event)
            assert service.events is not None
            service.events.delivery.poll = 0.1
            runner = web.AppRunner(app)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


async def _purchase_succeeded_once(config: BillingConfig) -> None:
    seen: list[Event] = []

    async def on_event(event: Event) -> None:
        seen.append(event)

    headers = TokenFactory(config).headers("ann")
    async with shop_servers(config, on_event) as urls, aiohttp.ClientSession() as http:

        async def poll(url: str) -> int:
            async with http.get(f"{url}/v1/api/billing/purchase/status/pi_1", headers=headers) as reply:
                assert (await reply.json())["status"] == "succeeded"
                return reply.status

        statuses = await asyncio.gather(*(poll(url) for url in urls * 10))
        assert set(statuses) == {200}
        await until(lambda: len(seen) >= 1)
        await asyncio.sleep(0.5)
    assert len(seen) == 1
    (event,) = seen
    assert (event.kind, event.user_id, event.namespace) == ("purchase.succeeded", "ann", "local")
    assert event.data == {"payment_id": "pi_1", "credits_added": 20, "balance_after": 0}


async def test_purchase_succeeded_is_emitted_once_by_two_processes_on_one_data_dir(tmp_path: Path) -> None:
    await _purchase_succeeded_once(make_config(tmp_path))


async def test_purchase_succeeded_is_emitted_once_by_two_processes_on_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    await _purchase_succeeded_once(make_config(tmp_path, database_url=pg_url, database_pool_size=2))


def test_on_event_must_be_async(tmp_path: Path) -> None:
    def plain(event: Event) -> None:
        return None

    class Handler:
        async def __call__(self, event: Event) -> None:
            return None

    with pytest.raises(ConfigError, match="async function"):
        setup_billing(web.Application(), make_config(tmp_path), environ={}, on_event=plain)  # type: ignore[arg-type]
    setup_billing(web.Application(), make_config(tmp_path), environ={}, on_event=Handler())
    partial = functools.partial(Handler().__call__)
    setup_billing(web.Application(), make_config(tmp_path), environ={}, on_event=partial)


# -- the outbox's records, on both engines ------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def event_store_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "sqlite":
        return SQLiteDatabase(tmp_path / "events.sqlite3")
    return PostgresDatabase(parse_database_url(request.getfixturevalue("pg_url")), max_size=2)


async def test_the_store_leases_retries_releases_and_prunes(event_store_engine: Engine) -> None:
    store = event_store(event_store_engine)
    await store.open()
    try:
        first = await store.add("purchase.succeeded", "local", "ann", {"payment_id": "pi_1"}, "p:pi_1")
        assert first is not None
        assert await store.add("purchase.succeeded", "local", "ann", {"payment_id": "pi_1"}, "p:pi_1") is None
        second = await store.add("credit.granted", "local", "bob", {"amount": 5})
        claimed = await store.claim("me", 60, 10)
        assert [e.event_id for e in claimed] == [first, second]
        assert await store.claim("you", 60, 10) == []  # leased: nobody else takes them
        await store.failed(first, "you", 0, frozenset(), "not yours")  # another's claim: no effect
        await store.failed(first, "me", 0, frozenset({"callback"}), "webhook: HTTP 500")
        (again,) = await store.claim("you", 60, 10)
        assert (again.event_id, again.attempts, again.sinks_done) == (first, 1, frozenset({"callback"}))
        await store.release("me")  # `me` stops: its claim (second) is due at once
        assert [e.event_id for e in await store.claim("you", 60, 10)] == [second]
        await store.delivered(first, frozenset({"callback", "webhook"}))
        stats = await store.stats()
        assert (stats.pending, stats.most_attempts) == (1, 0)
        assert await store.prune(time.time() - 3600) == 0  # delivered just now: kept
        assert await store.prune(time.time() + 3600) == 1
        assert [(e.event_id, delivered) for e, delivered in await store.all()] == [(second, False)]
    finally:
        await store.close()
