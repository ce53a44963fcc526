"""The audit trail: each kind of money and auth event, driven over real HTTP, as a JSON line on
`ciris_billing_proxy.audit` and as a row in the store, with no token, password or purchase token."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import Identity, PurchaseStatus, credit_gate
from ciris_billing_proxy.errors import ProviderUnavailable
from ciris_billing_proxy.login import tried_name_digest
from ciris_billing_proxy.ops.audit import AUDIT_LOGGER, AuditKind, AuditTrail
from ciris_billing_proxy.store.audit import AuditStore, Row, audit_store
from ciris_billing_proxy.store.engine import Migrated
from ciris_billing_proxy.testing import TokenFactory

from .conftest import ClientFactory, CountingAuthenticator, make_config
from .default_paths import APP_STORE, CREDITS, GOOGLE_PLAY, INITIATE, LOGIN, LOGOUT, REFRESH, STATUS
from .providers import MobileShopProvider

INTERACT = "/v1/agent/interact"
SEARCH = "/v1/agent/search"
PURCHASE_TOKEN = "purchase-token-0123456789"
FIELDS = ["time", "event", "user", "request_id", "outcome", "amount", "reference"]


class SettlingShop(MobileShopProvider):
    """Purchases succeed, but for the second of a user's, which fails."""

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        status = await super().purchase_status(identity, payment_id)
        if payment_id == "pi_2":
            return PurchaseStatus(status="failed")
        return status


def _agent(app: web.Application) -> None:
    @credit_gate
    async def interact(request: web.Request) -> web.Response:
        if (await request.json()).get("fail"):
            return web.json_response({"detail": "model down"}, status=500)
        return web.json_response({"ok": True})

    app.router.add_post(INTERACT, interact)


def _events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT_LOGGER]


async def _rows(url: str) -> list[Row]:
    store = audit_store(url)
    await store.open()
    try:
        return await store.recent(1000)
    finally:
        await store.close()


async def _login(client: Any, password: str) -> Any:
    return await client.post(LOGIN, json={"username": "ann", "password": password})


async def test_every_kind_is_logged_and_kept(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    url = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    config = make_config(tmp_path, database_url=url, login_max_failures_per_user=2)
    client = await make_client(
        config, provider=SettlingShop(credits=1), host=_agent, authenticate=CountingAuthenticator()
    )
    secrets: list[str] = ["correct horse", "wrong horse", PURCHASE_TOKEN]

    assert (await _login(client, "wrong horse")).status == 401
    first = await _login(client, "correct horse")
    token = (await first.json())["access_token"]
    secrets.append(token)
    headers = {"Authorization": f"Bearer {token}", "X-Request-ID": "req-spend-1"}
    assert (await client.post(INTERACT, json={}, headers=headers)).status == 200
    headers["X-Request-ID"] = "req-refused-1"
    assert (await client.post(INTERACT, json={"fail": True}, headers=headers)).status == 402
    del headers["X-Request-ID"]
    for _ in range(2):
        reply = await client.post(INITIATE, json={}, headers=headers)
        secrets.append((await reply.json())["client_secret"])
    for payment in ("pi_1", "pi_2", "pi_1"):  # a second poll of a settled payment is no new fact
        assert (await client.get(STATUS + payment, headers=headers)).status == 200
    google = {"purchase_token": PURCHASE_TOKEN, "product_id": "credits_100", "package_name": "ai.ciris"}
    assert (await client.post(GOOGLE_PLAY, json=google, headers=headers)).status == 200
    apple = {"transaction_id": "bad-" + PURCHASE_TOKEN, "product_id": "credits_100"}
    assert (await client.post(APP_STORE, json=apple, headers=headers)).status == 200
    refreshed = await client.post(REFRESH, headers=headers)
    token = (await refreshed.json())["access_token"]
    secrets.append(token)
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.post(LOGOUT, headers=headers)).status == 200
    for _ in range(2):
        assert (await _login(client, "wrong horse")).status == 401
    assert (await _login(client, "correct horse")).status == 429
    for _ in range(100):  # written in the background, about every 100 ms, while serving
        if len(await _rows(url)) >= 12:
            break
        await asyncio.sleep(0.05)
    assert len(await _rows(url)) >= 12
    await client.close()  # the rest at shutdown

    events = _events(caplog)
    user = "local:ann"
    # A failed or refused login keeps a digest of the name tried, never the name (it may be a password).
    tried = f"local:{tried_name_digest('ann')}"
    got = [(e["event"], e["user"], e["outcome"], e["amount"], e["reference"]) for e in events]
    assert got == [
        ("login_failed", tried, "refused", None, "127.0.0.1"),
        ("login_ok", user, "ok", None, "127.0.0.1"),
        ("spend", user, "ok", 1, got[2][4]),
        ("spend", user, "refused", 1, got[3][4]),
        ("purchase_initiated", user, "ok", 20, "pi_1"),
        ("purchase_initiated", user, "ok", 20, "pi_2"),
        ("purchase_settled", user, "ok", 20, "pi_1"),
        ("purchase_failed", user, "failed", 0, "pi_2"),
        ("store_verification", user, "ok", 100, "verify_google_play"),
        ("store_verification", user, "refused", 0, "verify_app_store"),
        ("refresh", user, "ok", None, None),
        ("logout", user, "ok", None, None),
        ("login_failed", tried, "refused", None, "127.0.0.1"),
        ("login_failed", tried, "refused", None, "127.0.0.1"),
        ("login_locked", tried, "refused", None, "127.0.0.1"),
    ]
    assert [e["request_id"] for e in events[2:4]] == ["req-spend-1", "req-refused-1"]
    assert all(list(e) == FIELDS and e["request_id"] for e in events)
    # The others: test_a_use_given_back_is_a_refund..., test_token_limits_logouts_everywhere_and_tools,
    # tests/test_weighted_gate.py (settle), tests/test_admin_credits.py (credit_adjusted, admin_refused) and
    # tests/test_stripe_provider.py (stripe_webhook, clawback).
    assert {e["event"] for e in events} | {
        "give_back",
        "refund",
        "login_limited",
        "logout_everywhere",
        "settle",
        "credit_adjusted",
        "admin_refused",
        "stripe_webhook",
        "clawback",
    } == set(AuditKind)
    rows = await _rows(url)
    assert rows == [tuple(e.values()) for e in events]
    for secret in secrets:
        assert secret not in caplog.text
        assert secret not in repr(rows)


async def test_a_use_given_back_is_a_refund_when_the_provider_sells_credits(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    config = make_config(tmp_path)
    shop = await make_client(config, provider=SettlingShop(credits=5), host=_agent)
    free = await make_client(make_config(tmp_path / "free"), host=_agent)
    headers = TokenFactory(config).headers("ann")
    for client in (shop, free):
        assert (await client.post(INTERACT, json={"fail": True}, headers=headers)).status == 500
        assert (await client.get(CREDITS, headers=headers)).status == 200
    got = [(e["event"], e["outcome"]) for e in _events(caplog)]
    assert got == [("spend", "ok"), ("refund", "ok"), ("spend", "ok"), ("give_back", "ok")]
    spends = [e for e in _events(caplog) if e["event"] == "spend"]
    assert [e["reference"] for e in _events(caplog) if e["event"] != "spend"] == [
        s["reference"] for s in spends
    ]


async def test_token_limits_logouts_everywhere_and_tools(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The facts the sessions and tool credits brought: a login or refresh refused for too many new
    tokens, a logout of every session, and a tool's uses (the product in the reference)."""
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    options = {"database": ":memory:", "products": {"web_search": {"free_uses": 2}}}
    config = make_config(tmp_path, provider_options=options, token_issue_max_per_user=2)

    def host(app: web.Application) -> None:
        @credit_gate(product="web_search")
        async def search(request: web.Request) -> web.Response:
            if request.query.get("fail"):
                return web.json_response({"detail": "search engine down"}, status=502)
            return web.json_response({"ok": True})

        app.router.add_post(SEARCH, search)

    client = await make_client(config, host=host, authenticate=CountingAuthenticator())
    tokens = [(await (await _login(client, "correct horse")).json())["access_token"] for _ in range(2)]
    limited = await _login(client, "correct horse")
    assert limited.status == 429
    assert "Retry-After" in limited.headers
    headers = {"Authorization": f"Bearer {tokens[0]}"}
    assert (await client.post(REFRESH, headers=headers)).status == 429
    assert (await client.post(SEARCH + "?fail=1", headers=headers)).status == 502
    assert (await client.post(SEARCH, headers=headers)).status == 200
    assert (await client.post(LOGOUT, json={"everywhere": True}, headers=headers)).status == 200
    assert (await client.post(SEARCH, headers={"Authorization": f"Bearer {tokens[1]}"})).status == 401

    events = _events(caplog)
    user = "local:ann"
    got = [(e["event"], e["user"], e["outcome"], e["amount"]) for e in events]
    assert got == [
        ("login_ok", user, "ok", None),
        ("login_ok", user, "ok", None),
        ("login_limited", user, "refused", None),
        ("refresh", user, "refused", None),
        ("spend", user, "ok", 1),
        ("give_back", user, "ok", 1),
        ("spend", user, "ok", 1),
        ("logout_everywhere", user, "ok", None),
    ]
    uses = [e["reference"] for e in events[4:7]]
    assert all(reference.startswith("web_search:") for reference in uses)
    assert uses[0] == uses[1] != uses[2]
    for token in tokens:
        assert token not in caplog.text


async def test_kept_in_postgresql(make_client: ClientFactory, tmp_path: Path, pg_url: str) -> None:
    config = make_config(tmp_path, database_url=pg_url)
    client = await make_client(config, host=_agent, authenticate=CountingAuthenticator())
    token = (await (await _login(client, "correct horse")).json())["access_token"]
    interacted = await client.post(INTERACT, json={}, headers={"Authorization": f"Bearer {token}"})
    rid = interacted.headers["X-Request-ID"]
    await client.close()
    rows = await _rows(pg_url)
    assert [(r[1], r[2], r[4], r[5]) for r in rows] == [
        ("login_ok", "local:ann", "ok", None),
        ("spend", "local:ann", "ok", 1),
    ]
    assert rows[1][3] == rid


async def test_a_store_that_fails_never_fails_the_request(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    client = await make_client(make_config(tmp_path, database_url=url), host=_agent)
    with sqlite3.connect(tmp_path / "records.sqlite3") as db:
        db.execute("DROP TABLE audit_events")
    headers = TokenFactory(make_config(tmp_path)).headers("ann")
    for _ in range(3):
        assert (await client.post(INTERACT, json={}, headers=headers)).status == 200
    await asyncio.sleep(0.3)
    assert (await client.post(INTERACT, json={}, headers=headers)).status == 200
    await client.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # The store's own line (the SQLite engine turns the error into ProviderUnavailable), then the trail's.
    assert warnings[:2] == [
        "SQLite unavailable: no such table: audit_events",
        "Could not keep audit events in the store: ProviderUnavailable",
    ]
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize(
    ("user", "reference", "amount"),
    [
        ('local:a"b\\c', None, 1),
        ("local:zoë ✓", "ref\n\tline", None),
        (None, "web_search:5f0c", 0),
    ],
)
async def test_an_event_line_is_what_json_dumps_makes_of_its_fields(
    caplog: pytest.LogCaptureFixture, user: str | None, reference: str | None, amount: int | None
) -> None:
    """The line is filled in from a template on the hot path: byte for byte the JSON of the
    fields, whatever the names and references hold (quotes, backslashes, control characters,
    non-ASCII)."""
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    AuditTrail().record(AuditKind.SPEND, user, "ok", amount=amount, reference=reference)
    (record,) = [r for r in caplog.records if r.name == AUDIT_LOGGER]
    line = record.getMessage()
    fields = json.loads(line)
    assert list(fields) == FIELDS
    expected = {
        "time": fields["time"],
        "event": "spend",
        "user": user,
        "request_id": None,
        "outcome": "ok",
        "amount": amount,
        "reference": reference,
    }
    assert line == json.dumps(expected)


class _SlowStore(AuditStore):
    """An audit store whose writes wait until the test lets them end, as written or refused."""

    def __init__(self) -> None:
        self.calls: list[list[Row]] = []
        self.started = asyncio.Event()
        self.outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def open(self) -> Migrated:
        return Migrated("audit", 1, 0)

    async def close(self) -> None: ...

    async def add(self, rows: Sequence[Row]) -> None:
        self.calls.append(list(rows))
        self.started.set()
        await asyncio.shield(self.outcome)

    async def recent(self, limit: int) -> list[Row]:
        return []


@pytest.mark.parametrize("written", [True, False])
async def test_a_write_under_way_at_shutdown_is_waited_for_not_sent_again(
    written: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer is cancelled at shutdown while a batch is being written: the last write waits for
    that one instead of writing its rows again beside it, keeps them as not kept if it failed, and
    leaves no failed task behind (asyncio's "Task exception was never retrieved" with a traceback,
    seen with the database stalled at shutdown)."""
    store = _SlowStore()
    trail = AuditTrail(lambda: store)
    lifespan = trail.lifespan(web.Application())
    await lifespan.__anext__()
    trail.record(AuditKind.SPEND, "local:ann", "ok", amount=1, reference="k")
    await asyncio.wait_for(store.started.wait(), 5)
    stopping = asyncio.ensure_future(lifespan.__anext__())
    await asyncio.sleep(0.05)
    if written:
        store.outcome.set_result(None)
    else:
        store.outcome.set_exception(ProviderUnavailable())
    with pytest.raises(StopAsyncIteration):
        await stopping
    assert len(store.calls) == 1  # waited for, not written a second time beside it
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if written:
        assert warnings == []
    else:
        assert warnings == [
            "Could not keep audit events in the store: ProviderUnavailable",
            "Audit events not kept in the store at shutdown: 1",
        ]
    assert not [r for r in caplog.records if r.exc_info]
