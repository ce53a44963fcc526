"""Purchases started through two app instances on one database (PostgreSQL, or one SQLite file on
one host) behave as one agent's: an `Idempotency-Key` replays on either, a double click on the other
instance gets the same payment, and simultaneous initiates make one PaymentIntent. Counted at the
fake backend, which creates a new PaymentIntent for every purchase call a second apart."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.database_url import parse_database_url
from ciris_billing_proxy.providers.ciris.sealing import ReplySeal
from ciris_billing_proxy.store import PostgresDatabase, SQLiteDatabase
from ciris_billing_proxy.store.engine import Engine
from ciris_billing_proxy.store.replays import Pending, Slot, Taken, replay_store
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import with_options
from .conftest import ClientFactory
from .default_paths import INITIATE, STATUS
from .postgres import TcpProxy, fetch

Client = TestClient[web.Request, web.Application]


def on_database(config: BillingConfig, url: str) -> BillingConfig:
    return BillingConfig.model_validate(config.model_dump() | {"database_url": url})


@pytest.fixture(params=["postgresql", "sqlite"])
def shared(
    request: pytest.FixtureRequest, ciris_billing_config: BillingConfig, tmp_path: Path
) -> BillingConfig:
    """The ciris config of two instances sharing one database: PostgreSQL, or one SQLite file."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    return on_database(ciris_billing_config, url)


async def _pair(make_client: ClientFactory, config: BillingConfig) -> tuple[Client, Client]:
    return await make_client(config), await make_client(config)


def _buyer(config: BillingConfig, name: str, key: str | None = None) -> dict[str, str]:
    headers = TokenFactory(config).headers(name, email=f"{name}@example.com")
    return headers if key is None else {**headers, "Idempotency-Key": key}


async def _initiate(client: Client, headers: dict[str, str]) -> dict[str, Any]:
    reply = await client.post(INITIATE, json={}, headers=headers)
    assert reply.status == 200, await reply.text()
    body: dict[str, Any] = await reply.json()
    return body


async def test_an_idempotency_key_sent_to_the_other_instance_later_replays_the_same_payment(
    shared: BillingConfig, make_client: ClientFactory, ciris_fake_backend: FakeBillingBackend
) -> None:
    config = with_options(shared, purchase_reuse_seconds=0)
    a, b = await _pair(make_client, config)
    one = await _initiate(a, _buyer(config, "kim", "click-1"))
    ciris_fake_backend.ledger.clock_offset += timedelta(seconds=1.5)  # a later second at the backend
    two = await _initiate(b, _buyer(config, "kim", "click-1"))
    assert two == one  # the client secret included
    assert ciris_fake_backend.calls["purchases"] == 1
    assert len(ciris_fake_backend.ledger.payments) == 1
    other = await _initiate(b, _buyer(config, "lee", "click-1"))  # keys are per user
    assert other["payment_id"] != one["payment_id"]
    assert len(ciris_fake_backend.ledger.payments) == 2


async def test_a_double_click_across_instances_gets_the_same_payment_while_it_awaits_payment(
    shared: BillingConfig, make_client: ClientFactory, ciris_fake_backend: FakeBillingBackend
) -> None:
    a, b = await _pair(make_client, shared)
    fake = ciris_fake_backend
    one = await _initiate(a, _buyer(shared, "max"))
    fake.ledger.clock_offset += timedelta(seconds=2)
    assert await _initiate(b, _buyer(shared, "max")) == one
    assert fake.calls["purchases"] == 1
    fake.ledger.set_payment_status(one["payment_id"], "canceled")
    fake.ledger.clock_offset += timedelta(seconds=2)
    three = await _initiate(a, _buyer(shared, "max"))  # an ended payment is not handed back
    assert three["payment_id"] != one["payment_id"]
    assert await _initiate(b, _buyer(shared, "max")) == three
    assert len(fake.ledger.payments) == 2


@pytest.mark.parametrize("key", ["same-key", None], ids=["same key", "no key"])
async def test_simultaneous_initiates_on_two_instances_make_one_payment_intent(
    shared: BillingConfig, make_client: ClientFactory, ciris_fake_backend: FakeBillingBackend, key: str | None
) -> None:
    a, b = await _pair(make_client, shared)
    # Slow purchases keep every initiate in flight together, on both instances.
    ciris_fake_backend.inject("latency", endpoint="purchases", seconds=0.3)
    users = ["u1", "u2", "u3"]
    replies = await asyncio.gather(
        *(_initiate((a, b)[i % 2], _buyer(shared, user, key)) for user in users for i in range(4))
    )
    by_user = {user: {r["payment_id"] for r in replies[n * 4 : n * 4 + 4]} for n, user in enumerate(users)}
    assert all(len(ids) == 1 for ids in by_user.values()), by_user
    assert len(ciris_fake_backend.ledger.payments) == 3
    assert ciris_fake_backend.calls["purchases"] == 3
    secrets = {r["client_secret"] for r in replies}
    assert len(secrets) == 3


async def test_the_payment_is_followed_on_the_other_instance_by_its_owner_only(
    shared: BillingConfig, make_client: ClientFactory, ciris_fake_backend: FakeBillingBackend
) -> None:
    a, b = await _pair(make_client, shared)
    started = await _initiate(a, _buyer(shared, "ann", "k"))
    assert (await b.get(STATUS + started["payment_id"], headers=_buyer(shared, "ann"))).status == 200
    other = await b.get(STATUS + started["payment_id"], headers=_buyer(shared, "bob"))
    assert (other.status, await other.json()) == (404, {"detail": "Payment not found"})


async def test_a_dump_of_the_database_holds_no_client_secret(
    pg_url: str,
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
) -> None:
    config = on_database(ciris_billing_config, pg_url)
    client = await make_client(config)
    bought = await _initiate(client, _buyer(config, "zed", "dump"))
    rows = await fetch(pg_url, "SELECT * FROM purchase_replays")
    assert {(row[2], row[3]) for row in rows} == {("key", "dump"), ("latest", "")}
    assert all(row[5] == bought["payment_id"] for row in rows)
    dumped = repr(rows) + repr(await fetch(pg_url, "SELECT * FROM payments"))
    assert bought["payment_id"] in dumped
    assert bought["client_secret"] not in dumped
    assert bought["client_secret"].encode() not in b"".join(bytes(row[6]) for row in rows)  # type: ignore[arg-type]
    # Kept for as long as each replays: a day for the key, the double-click window for the latest.
    left = dict(
        await fetch(
            pg_url,
            "SELECT kind, expires_at - EXTRACT(EPOCH FROM now())::float8 FROM purchase_replays",
        )
    )
    assert 86_000 < left["key"] <= 86_400  # type: ignore[operator]
    assert 0 < left["latest"] <= 10  # type: ignore[operator]


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """An engine, not yet opened, on a fresh database of each kind."""
    if request.param == "postgresql":
        return PostgresDatabase(parse_database_url(request.getfixturevalue("pg_url")))
    return SQLiteDatabase(tmp_path / "replays.sqlite3")


async def test_replies_expire_with_their_window_and_are_swept_from_the_database(engine: Engine) -> None:
    await engine.open()
    try:
        await _expire_and_sweep(engine)
    finally:
        await engine.close()


async def _expire_and_sweep(engine: Engine) -> None:
    store = replay_store(engine)
    await store.open()
    slot = Slot("local", "ann", "k")
    assert isinstance(await store.claim(slot, "t1", 30, None), Taken)
    assert await store.fill(slot, "t1", "pi_1", b"sealed", 0.0)  # a window that has already closed
    latest = Slot("local", "ann", None)
    assert isinstance(await store.claim(latest, "tl", 30, None), Taken)
    assert await store.fill(latest, "tl", "pi_1", b"sealed", 3600)
    assert await store.sweep() == 1
    # The expired reply is gone: a new purchase may start.
    assert isinstance(await store.claim(slot, "t2", 30, None), Taken)
    assert isinstance(await store.claim(slot, "t3", 30, None), Pending)
    assert type(await store.claim(latest, "t4", 30, None)).__name__ == "Found"
    # A lease that ran out (its process died) is taken over; the late holder cannot fill any more.
    await store.release(slot, "t2")
    assert isinstance(await store.claim(slot, "t5", 0.0, None), Taken)
    assert isinstance(await store.claim(slot, "t6", 30, None), Taken)
    assert not await store.fill(slot, "t5", "pi_2", b"late", 60)
    assert await store.fill(slot, "t6", "pi_3", b"sealed", 60)


def test_a_sealed_reply_opens_only_with_the_same_key_for_the_same_row() -> None:
    seal = ReplySeal("cbk_test_one")
    row = Slot("local", "ann", "k").binding()
    sealed = seal.seal(b'{"client_secret": "pi_1_secret_x"}', row)
    assert b"pi_1_secret_x" not in sealed
    assert seal.open(sealed, row) == b'{"client_secret": "pi_1_secret_x"}'
    assert seal.open(sealed, Slot("local", "bob", "k").binding()) is None
    assert seal.open(sealed, Slot("local", "ann", None).binding()) is None
    assert ReplySeal("cbk_test_two").open(sealed, row) is None
    assert seal.seal(b"same", row) != seal.seal(b"same", row)  # a fresh nonce each time


async def test_a_database_outage_on_initiate_is_503_json_and_creates_no_payment(
    pg_url: str,
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
) -> None:
    target = URL(pg_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    try:
        config = on_database(ciris_billing_config, proxy.url_for(pg_url))
        client = await make_client(config)
        one = await _initiate(client, _buyer(config, "ola", "k1"))
        await proxy.cut()
        for key in ("k1", "k2", None):
            reply = await client.post(INITIATE, json={}, headers=_buyer(config, "ola", key))
            assert (reply.status, await reply.json()) == (503, {"detail": "Billing service unavailable"})
        assert len(ciris_fake_backend.ledger.payments) == 1
        await proxy.restore()
        assert await _initiate(client, _buyer(config, "ola", "k1")) == one
    finally:
        await proxy.cut()
