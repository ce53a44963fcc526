"""Simultaneous initiates of one user, each with its own `Idempotency-Key` (issue #17, item 3).

Before, 10 at once answered 1x200 + 9x503 (each 503 an ERROR line any user could write at will), or
9x200 with 8 different keys handed one `payment_id` by a race, on SQLite and PostgreSQL alike. Now
every new PaymentIntent of a user is made under one claim in the store: with the double-click window
on (the default), the keys share the one PaymentIntent the first started (the documented reuse); with
it off, each key gets its own. Counted at the fake backend, whose Stripe idempotency key is the
account and the second (it hands back the same PaymentIntent within one second).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import with_options
from .conftest import ClientFactory
from .default_paths import INITIATE

Client = TestClient[web.Request, web.Application]


@pytest.fixture(params=["postgresql", "sqlite"])
def shared(
    request: pytest.FixtureRequest, ciris_billing_config: BillingConfig, tmp_path: Path
) -> BillingConfig:
    """Two instances' config on one database: PostgreSQL, or one SQLite file."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    return BillingConfig.model_validate(ciris_billing_config.model_dump() | {"database_url": url})


async def ten_at_once(config: BillingConfig, clients: list[Client]) -> list[tuple[int, Any]]:
    headers = TokenFactory(config).headers("eve", email="eve@example.com")
    replies = await asyncio.gather(
        *(
            clients[n % len(clients)].post(
                INITIATE, json={}, headers={**headers, "Idempotency-Key": f"key-{n}"}
            )
            for n in range(10)
        )
    )
    return [(r.status, await r.json()) for r in replies]


async def test_ten_keys_at_once_share_the_first_payment_within_the_double_click_window(
    shared: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clients = [await make_client(shared), await make_client(shared)]
    ciris_fake_backend.inject("latency", endpoint="purchases", seconds=0.2)
    with caplog.at_level(logging.WARNING):
        answers = await ten_at_once(shared, clients)
    assert [status for status, _ in answers] == [200] * 10, answers
    assert len({body["payment_id"] for _, body in answers}) == 1
    assert len(ciris_fake_backend.ledger.payments) == 1
    assert not [r for r in caplog.records if r.levelno > logging.WARNING]
    # Each key replays its own answer afterwards.
    again = await ten_at_once(shared, clients[::-1])
    assert again == answers


async def test_ten_keys_at_once_each_get_their_own_payment_without_the_double_click_window(
    shared: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = with_options(shared, purchase_reuse_seconds=0)
    clients = [await make_client(config), await make_client(config)]
    with caplog.at_level(logging.WARNING):
        answers = await ten_at_once(config, clients)
    assert [status for status, _ in answers] == [200] * 10, answers
    assert len({body["payment_id"] for _, body in answers}) == 10
    assert len(ciris_fake_backend.ledger.payments) == 10
    assert not [r for r in caplog.records if r.levelno > logging.WARNING]


async def test_new_payment_intents_are_limited_per_user_and_window(
    shared: BillingConfig, make_client: ClientFactory, ciris_fake_backend: FakeBillingBackend
) -> None:
    config = with_options(shared, purchase_reuse_seconds=0, purchase_max_per_user=3)
    clients = [await make_client(config), await make_client(config)]
    answers = await ten_at_once(config, clients)
    assert sorted(status for status, _ in answers) == [200] * 3 + [429] * 7, answers
    refused = [body for status, body in answers if status == 429]
    assert refused[0] == {"detail": "Too many purchases started; try again later"}
    assert len(ciris_fake_backend.ledger.payments) == 3
    reply = await clients[0].post(
        INITIATE,
        json={},
        headers={**TokenFactory(config).headers("eve", email="eve@example.com"), "Idempotency-Key": "x"},
    )
    assert reply.status == 429
    assert 3_500 < int(reply.headers["Retry-After"]) <= 3_600
    kept = await clients[1].post(  # a key answered before still replays
        INITIATE,
        json={},
        headers={
            **TokenFactory(config).headers("eve", email="eve@example.com"),
            "Idempotency-Key": next(f"key-{n}" for n, (status, _) in enumerate(answers) if status == 200),
        },
    )
    assert kept.status == 200
    other = TokenFactory(config).headers("fay", email="fay@example.com")  # per user
    assert (await clients[0].post(INITIATE, json={}, headers=other)).status == 200
