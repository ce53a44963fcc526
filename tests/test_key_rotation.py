"""Rotating the backend API key while replicas run: two instances on one PostgreSQL database with
different valid API keys (the fake backend accepts both), one `Idempotency-Key` sent to them in
turn, must make one PaymentIntent. Counted at the fake backend, which makes a new PaymentIntent for
every purchase call a second apart."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.providers.ciris.sealing import ReplySeal
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import with_options
from .conftest import ClientFactory
from .default_paths import INITIATE

REPLAY_SECRET = "replay-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
SHARED = {"replay_secret": REPLAY_SECRET}


async def initiate_four_times_alternating(
    make_client: ClientFactory, fake: FakeBillingBackend, old: BillingConfig, new: BillingConfig
) -> list[dict[str, Any]]:
    replicas = [await make_client(old), await make_client(new)]
    headers = {**TokenFactory(old).headers("kim", email="kim@example.com"), "Idempotency-Key": "buy-1"}
    replies = []
    for n in range(4):
        reply = await replicas[n % 2].post(INITIATE, json={}, headers=headers)
        assert reply.status == 200, await reply.text()
        replies.append(await reply.json())
        fake.ledger.clock_offset += timedelta(seconds=1.5)  # each call a later second at the backend
    return replies


@pytest.fixture
def rotating(
    ciris_billing_config: BillingConfig, ciris_fake_backend: FakeBillingBackend, pg_url: str
) -> tuple[BillingConfig, BillingConfig]:
    """Two replicas' configs on one database: the old API key, and a new one the backend accepts too."""
    shared = BillingConfig.model_validate(ciris_billing_config.model_dump() | {"database_url": pg_url})
    shared = with_options(shared, purchase_reuse_seconds=0)
    return shared, with_options(shared, api_key=ciris_fake_backend.add_api_key())


@pytest.mark.parametrize(
    "secrets",
    [
        pytest.param(
            ({"replay_secret": REPLAY_SECRET}, {"replay_secret": REPLAY_SECRET}), id="replay-secret"
        ),
        pytest.param(("new", "old"), id="accepted-api-keys"),
    ],
)
async def test_one_idempotency_key_makes_one_payment_intent_across_replicas_with_different_keys(
    rotating: tuple[BillingConfig, BillingConfig],
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    secrets: tuple[Any, Any],
) -> None:
    old, new = rotating
    keys = {"old": old.provider_options["api_key"], "new": new.provider_options["api_key"]}
    options = [
        given if isinstance(given, dict) else {"accepted_replay_secrets": keys[given]} for given in secrets
    ]
    replies = await initiate_four_times_alternating(
        make_client, ciris_fake_backend, with_options(old, **options[0]), with_options(new, **options[1])
    )
    assert all(reply == replies[0] for reply in replies)  # the client secret included
    assert ciris_fake_backend.calls["purchases"] == 1


async def test_without_a_shared_secret_each_replica_starts_its_own_payment_intent(
    rotating: tuple[BillingConfig, BillingConfig],
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the settings above are for (and what happened before they existed)."""
    replies = await initiate_four_times_alternating(make_client, ciris_fake_backend, *rotating)
    assert len({reply["payment_id"] for reply in replies}) > 1
    assert "Rotating the backend API key" in caplog.text


def test_a_seal_opens_what_any_of_its_secrets_sealed_and_seals_with_the_first() -> None:
    old, new = ReplySeal("old-key"), ReplySeal("new-key", "old-key")
    sealed = old.seal(b"reply", b"row")
    assert new.open(sealed, b"row") == b"reply"
    assert new.open(sealed, b"another row") is None
    assert old.open(new.seal(b"reply", b"row"), b"row") is None
    assert ReplySeal("old-key", "new-key").open(new.seal(b"reply", b"row"), b"row") == b"reply"
