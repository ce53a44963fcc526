"""The `ciris` provider's parts, each on its own: identities, reply mapping, the charge book and the
purchase desk (the last two against the fake backend over real HTTP)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from ciris_billing_proxy import (
    Identity,
    InsufficientCredit,
    InvalidRequest,
    PaymentNotFound,
    ProviderUnavailable,
)
from ciris_billing_proxy.providers.ciris.accounts import BackendAccounts
from ciris_billing_proxy.providers.ciris.backend import BillingBackend
from ciris_billing_proxy.providers.ciris.charges import ChargeBook
from ciris_billing_proxy.providers.ciris.purchases import PurchaseDesk
from ciris_billing_proxy.providers.ciris.sealing import ReplySeal
from ciris_billing_proxy.providers.ciris.settings import CirisSettings
from ciris_billing_proxy.providers.ciris.wire import BackendCredit, public_transaction, to_credit_status
from ciris_billing_proxy.store import SQLiteDatabase, payment_store, replay_store
from ciris_billing_proxy.testing import FakeBillingBackend

ANN = Identity("ann", "local", "OBSERVER", email="ann@example.com")


def test_local_users_are_agent_scoped_and_federated_users_are_not() -> None:
    accounts = BackendAccounts("agent-7")
    assert accounts.of(ANN)["external_id"] == "agent-7:ann"
    google = Identity("1182", "google", "OBSERVER")
    assert accounts.of(google) == {
        "oauth_provider": "oauth:google",
        "external_id": "1182",
        "agent_id": "agent-7",
    }
    long = accounts.of(Identity("x" * 255, "local", "OBSERVER"))["external_id"]
    assert len(long) <= 255
    assert long.startswith("agent-7:sha256:")


def test_idempotency_keys_are_deterministic_and_namespaced() -> None:
    accounts = BackendAccounts("a")
    assert accounts.key("charge", ANN, "r1") == accounts.key("charge", ANN, "r1")
    assert accounts.key("charge", ANN, "r1") != accounts.key("refund", ANN, "r1")
    assert accounts.key("charge", ANN, "r1") != BackendAccounts("b").key("charge", ANN, "r1")
    assert accounts.key("charge", ANN, "r1") != accounts.key("charge", Identity("ann", "google", "X"), "r1")


def test_daily_uses_count_as_free_and_no_credit_shows_zeros() -> None:
    status = to_credit_status(
        BackendCredit(
            has_credit=True, free_uses_remaining=3, daily_free_uses_remaining=2, credits_remaining=4
        )
    )
    assert (status.free_uses_remaining, status.credits_remaining, status.has_credit) == (5, 4, True)
    suspended = to_credit_status(
        BackendCredit(
            has_credit=False, reason="Account suspended", free_uses_remaining=3, credits_remaining=4
        )
    )
    assert (suspended.free_uses_remaining, suspended.credits_remaining, suspended.reason) == (
        0,
        0,
        "Account suspended",
    )
    with pytest.raises(ProviderUnavailable):
        to_credit_status(BackendCredit(has_credit=False, purchase_required=True))  # no price given


def test_public_transactions_hide_the_request_key() -> None:
    item = {"description": "Agent interaction " + "ab" * 16, "type": "charge"}
    assert public_transaction(item)["description"] == "Agent interaction"
    assert public_transaction({"description": "Manual grant"})["description"] == "Manual grant"


@pytest.fixture
async def backend(ciris_fake_backend: FakeBillingBackend) -> AsyncIterator[BillingBackend]:
    settings = CirisSettings(
        api_url=ciris_fake_backend.url,
        api_key=ciris_fake_backend.api_key,
        backoff_seconds=0.01,  # type: ignore[arg-type]
    )
    backend = BillingBackend(settings, BackendAccounts("parts"))
    await backend.start()
    yield backend
    await backend.stop()


def refunds(fake: FakeBillingBackend) -> int:
    with fake.ledger.lock:
        return sum(t.transaction_type == "refund" for t in fake.ledger.transactions)


async def test_the_charge_book_refunds_a_paid_charge_once_and_a_free_one_never(
    backend: BillingBackend, ciris_fake_backend: FakeBillingBackend
) -> None:
    fake, book = ciris_fake_backend, ChargeBook(backend)
    await book.spend(ANN, "free-1")  # a daily free use
    await book.give_back(ANN, "free-1")
    assert refunds(fake) == 0
    fake.use_up_free_uses("oauth:local", "parts:ann")
    fake.grant("oauth:local", "parts:ann", 2)
    await book.spend(ANN, "paid-1")
    await book.spend(ANN, "paid-1")  # the same request again: one charge
    assert fake.account("oauth:local", "parts:ann")["credits_remaining"] == 1
    await book.give_back(ANN, "paid-1")
    await book.give_back(ANN, "paid-1")
    await book.give_back(ANN, "never-spent")
    assert refunds(fake) == 1
    assert fake.account("oauth:local", "parts:ann")["credits_remaining"] == 2
    await book.spend(ANN, "paid-2")
    await book.spend(ANN, "paid-3")
    with pytest.raises(InsufficientCredit):
        await book.spend(ANN, "paid-4")


async def test_the_purchase_desk_keeps_payments_to_their_owner(
    backend: BillingBackend, ciris_fake_backend: FakeBillingBackend
) -> None:
    engine = SQLiteDatabase(":memory:")
    store, replays = payment_store(engine), replay_store(engine)
    await store.open()
    await replays.open()
    try:
        desk = PurchaseDesk(backend, store, replays, ReplySeal(backend.settings.api_key.get_secret_value()))
        with pytest.raises(InvalidRequest):
            await desk.initiate(Identity("nomail", "local", "OBSERVER"), None, None)
        bought = await desk.initiate(ANN, None, "k1")
        assert await desk.initiate(ANN, None, "k1") == bought
        assert (await desk.status(ANN, bought.payment_id)).status == "requires_payment_method"
        with pytest.raises(PaymentNotFound):
            await desk.status(Identity("bob", "local", "OBSERVER"), bought.payment_id)
        ciris_fake_backend.confirm_payment(bought.payment_id)
        done: Any = await desk.status(ANN, bought.payment_id)
        assert (done.status, done.credits_added, done.balance_after) == ("succeeded", 20, 20)
        await desk.aclose()
    finally:
        await store.close()
