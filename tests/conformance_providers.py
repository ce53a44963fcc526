"""A correct in-memory provider that sells credit, and mutants of it with one defect each.

tests/test_conformance.py copies this module into a pytester directory and runs the conformance kit
against each class: the reference must pass every check, each mutant must fail with its rule.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ciris_billing_proxy import (
    AppStorePurchase,
    CreditProvider,
    CreditStatus,
    GooglePlayPurchase,
    Identity,
    InsufficientCredit,
    PaymentNotFound,
    PurchaseInitiated,
    PurchaseOptions,
    PurchaseStatus,
    StoreVerification,
)
from ciris_billing_proxy.models import Transaction, TransactionPage

User = tuple[str, str]
PACK = PurchaseOptions(price_minor=500, uses=10, currency="USD")


@dataclass
class Payment:
    owner: User
    state: str = "requires_payment_method"


@dataclass
class Account:
    free: int = 3
    paid: int = 0
    used: int = 0
    history: list[Transaction] = field(default_factory=list)

    def record(self, kind: str, amount: int, description: str) -> None:
        self.history.append(
            Transaction(
                transaction_id=uuid.uuid4().hex,
                type="charge" if kind == "charge" else "credit",
                amount_minor=amount,
                currency="USD",
                description=description,
                created_at=datetime.now(UTC).isoformat(),
                balance_after=self.paid,
            )
        )


class Reference(CreditProvider):
    """Three free uses per user, then paid credit; a purchase adds a pack once it is paid."""

    name = "reference"

    def __init__(self) -> None:
        self.accounts: dict[User, Account] = {}
        #: (user, key) -> the pool the spend took, or None once given back.
        self.spent: dict[tuple[User, str], str | None] = {}
        self.payments: dict[str, Payment] = {}
        self.purchases: dict[tuple[User, str], PurchaseInitiated] = {}

    @property
    def purchases_enabled(self) -> bool:
        return True

    def account(self, identity: Identity) -> Account:
        return self.accounts.setdefault(identity.key, Account())

    async def credit_status(self, identity: Identity) -> CreditStatus:
        account = self.account(identity)
        has_credit = account.free + account.paid > 0
        return CreditStatus(
            has_credit=has_credit,
            credits_remaining=account.paid,
            free_uses_remaining=account.free,
            total_uses=account.used,
            plan_name="reference",
            purchase_required=not has_credit,
            purchase_options=None if has_credit else PACK,
        )

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        if (identity.key, idempotency_key) in self.spent:
            return
        self.take(identity, idempotency_key)

    def take(self, identity: Identity, idempotency_key: str) -> None:
        account = self.account(identity)
        if account.free:
            account.free -= 1
            pool = "free"
        elif account.paid:
            account.paid -= 1
            pool = "paid"
        else:
            raise InsufficientCredit("No uses left")
        account.used += 1
        account.record("charge", -1, "Agent interaction")
        self.spent[(identity.key, idempotency_key)] = pool

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        pool = self.spent.get((identity.key, idempotency_key))
        if pool is None:
            return
        self.spent[(identity.key, idempotency_key)] = None
        account = self.account(identity)
        if pool == "free":
            account.free += 1
        else:
            account.paid += 1
        account.record("credit", 1, "Use given back")

    async def initiate_purchase(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None
    ) -> PurchaseInitiated:
        slot = (identity.key, idempotency_key or uuid.uuid4().hex)
        if slot not in self.purchases:
            payment_id = f"pay_{uuid.uuid4().hex}"
            self.payments[payment_id] = Payment(identity.key)
            self.purchases[slot] = PurchaseInitiated(
                payment_id=payment_id,
                client_secret=f"{payment_id}_secret",
                amount_minor=PACK.price_minor,
                currency=PACK.currency,
                uses_purchased=PACK.uses,
                publishable_key="pk_test_reference",
            )
        return self.purchases[slot]

    def payment_of(self, identity: Identity, payment_id: str) -> Payment:
        payment = self.payments.get(payment_id)
        if payment is None or payment.owner != identity.key:
            raise PaymentNotFound
        return payment

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        payment = self.payment_of(identity, payment_id)
        if payment.state != "succeeded":
            return PurchaseStatus.model_validate({"status": payment.state})
        paid = self.account(identity).paid
        return PurchaseStatus(status="succeeded", credits_added=PACK.uses, balance_after=paid)

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        newest_first = self.account(identity).history[::-1]
        page = newest_first[offset : offset + limit]
        return TransactionPage(
            transactions=page, total_count=len(newest_first), has_more=offset + len(page) < len(newest_first)
        )

    # What the test's hooks call: an operator's grant, and the payment system's confirmation.
    def grant(self, identity: Identity, uses: int) -> None:
        self.account(identity).paid += uses

    def pay(self, payment_id: str) -> None:
        payment = self.payments[payment_id]
        if payment.state != "succeeded":
            payment.state = "succeeded"
            account = self.accounts[payment.owner]
            account.paid += PACK.uses
            account.record("credit", PACK.uses, "Purchase")


class GivesBackOnEveryCall(Reference):
    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        self.account(identity).paid += 1


class SpendIgnoresKeys(Reference):
    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        self.take(identity, idempotency_key)


class StatusAsDict(Reference):
    async def credit_status(self, identity: Identity) -> Any:
        return (await super().credit_status(identity)).model_dump()


class SyncSpend(Reference):
    def spend(self, identity: Identity, idempotency_key: str) -> None:
        if (identity.key, idempotency_key) not in self.spent:
            self.take(identity, idempotency_key)


class ConstructedStatus(Reference):
    """Builds its status with `model_construct`, which skips the model's own consistency rules."""

    async def credit_status(self, identity: Identity) -> CreditStatus:
        status = await super().credit_status(identity)
        return CreditStatus.model_construct(**{**dict(status), "has_credit": True})


class RacySpend(Reference):
    """Reads the balance, awaits, then writes what it read minus one: concurrent spends all pass."""

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        account = self.account(identity)
        free, paid = account.free, account.paid
        if free + paid == 0:
            raise InsufficientCredit("No uses left")
        await asyncio.sleep(0)
        account.free, account.paid = (free - 1, paid) if free else (free, paid - 1)
        self.spent[(identity.key, idempotency_key)] = "free" if free else "paid"


class KeysSharedAcrossUsers(Reference):
    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        if any(key == idempotency_key for _, key in self.spent):
            return
        self.take(identity, idempotency_key)


class PaymentsVisibleToAll(Reference):
    def payment_of(self, identity: Identity, payment_id: str) -> Payment:
        payment = self.payments.get(payment_id)
        if payment is None:
            raise PaymentNotFound
        return payment


class CreditsOnEveryStatus(Reference):
    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        status = await super().purchase_status(identity, payment_id)
        if status.status == "succeeded":
            self.account(identity).paid += PACK.uses
        return status


class IgnoresLimit(Reference):
    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        return await super().transactions(identity, 100, offset)


class UnsendableMetadata(Reference):
    """Lists transactions whose metadata is no JSON (a set)."""

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        page = await super().transactions(identity, limit, offset)
        items = [item.model_copy(update={"metadata": {"tags": {"a"}}}) for item in page.transactions]
        return page.model_copy(update={"transactions": items})


class LeaksTask(Reference):
    """Starts a background task that `stop` never ends."""

    async def start(self) -> None:
        self.ticker = asyncio.ensure_future(asyncio.Event().wait())


def play_purchase() -> GooglePlayPurchase:
    return GooglePlayPurchase(purchase_token=uuid.uuid4().hex, product_id="pack", package_name="app")


def store_purchase() -> AppStorePurchase:
    return AppStorePurchase(transaction_id=uuid.uuid4().hex, product_id="pack")


class StoreReference(Reference):
    """Redeems app store purchases too: a pack per token, once."""

    def __init__(self) -> None:
        super().__init__()
        self.redeemed: set[str] = set()

    @property
    def google_play_enabled(self) -> bool:
        return True

    @property
    def apple_storekit_enabled(self) -> bool:
        return True

    async def verify_google_play(self, identity: Identity, purchase: GooglePlayPurchase) -> StoreVerification:
        return await self.redeem(identity, f"play:{purchase.purchase_token}")

    async def verify_app_store(self, identity: Identity, purchase: AppStorePurchase) -> StoreVerification:
        return await self.redeem(identity, f"store:{purchase.transaction_id}")

    async def redeem(self, identity: Identity, token: str) -> StoreVerification:
        await asyncio.sleep(0)  # a real store is asked over the network: let calls interleave
        repeat = token in self.redeemed
        self.redeemed.add(token)
        account = self.account(identity)
        if not repeat:
            account.paid += PACK.uses
            account.record("credit", PACK.uses, "Store purchase")
        return StoreVerification(
            success=True,
            credits_added=0 if repeat else PACK.uses,
            new_balance=account.paid,
            already_processed=repeat,
        )


class StoreCreditsEveryTime(StoreReference):
    async def redeem(self, identity: Identity, token: str) -> StoreVerification:
        self.redeemed.discard(token)
        return await super().redeem(identity, token)


class StoreWithoutDeclaring(Reference):
    """Redeems Google Play purchases while declaring none."""

    async def verify_google_play(self, identity: Identity, purchase: GooglePlayPurchase) -> StoreVerification:
        self.account(identity).paid += PACK.uses
        return StoreVerification(
            success=True,
            credits_added=PACK.uses,
            new_balance=self.account(identity).paid,
            already_processed=False,
        )
