"""Small in-process providers for testing the proxy's own layers (routes, gate, cache) in isolation.

The paid flow against a real backend contract is tested with the `ciris` provider and the fake
backend; these only stand in where the proxy's behaviour, not a backend's, is under test.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

from ciris_billing_proxy import (
    AppStorePurchase,
    CreditProvider,
    CreditStatus,
    GooglePlayPurchase,
    Identity,
    InsufficientCredit,
    PaymentNotFound,
    ProviderUnavailable,
    PurchaseInitiated,
    PurchaseStatus,
    StoreVerification,
)


class ShopProvider(CreditProvider):
    """Paid credits only, kept in memory; purchases succeed at once. Counts every call."""

    name = "shop"

    def __init__(self, credits: int = 0) -> None:
        self.start_credits = credits
        self.balances: dict[str, int] = {}
        self.payments: dict[str, tuple[str, int]] = {}
        self.calls: dict[str, int] = {}
        self.spent: set[str] = set()
        self.fail: Exception | None = None
        self.delay = 0.0
        self.started = self.stopped = False

    @property
    def purchases_enabled(self) -> bool:
        return True

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def _enter(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail

    def balance(self, identity: Identity) -> int:
        return self.balances.setdefault(identity.key, self.start_credits)

    async def credit_status(self, identity: Identity) -> CreditStatus:
        await self._enter("credit_status")
        left = self.balance(identity)
        return CreditStatus(
            has_credit=left > 0,
            credits_remaining=left,
            free_uses_remaining=0,
            total_uses=0,
            plan_name="shop",
            purchase_required=left == 0,
            purchase_options={"price_minor": 500, "uses": 20, "currency": "USD"} if left == 0 else None,
        )

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        await self._enter("spend")
        if idempotency_key in self.spent:
            return
        if self.balance(identity) <= 0:
            raise InsufficientCredit("No free uses or credits remaining")
        self.balances[identity.key] -= 1
        self.spent.add(idempotency_key)

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        await self._enter("give_back")
        if idempotency_key in self.spent:
            self.spent.discard(idempotency_key)
            self.balances[identity.key] += 1

    async def initiate_purchase(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None
    ) -> PurchaseInitiated:
        await self._enter("initiate_purchase")
        payment_id = f"pi_{len(self.payments) + 1}"
        self.payments[payment_id] = (identity.key, 20)
        self.balances[identity.key] = self.balance(identity) + 20
        return PurchaseInitiated(
            payment_id=payment_id,
            client_secret=f"{payment_id}_secret_x",
            amount_minor=500,
            currency="USD",
            uses_purchased=20,
            publishable_key="pk_test_x",
        )

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        await self._enter("purchase_status")
        owner = self.payments.get(payment_id)
        if owner is None or owner[0] != identity.key:
            raise PaymentNotFound
        return PurchaseStatus(
            status="succeeded", credits_added=owner[1], balance_after=self.balance(identity)
        )


class MobileShopProvider(ShopProvider):
    """A third-party provider that redeems app store purchases: 100 credits per token, once; tokens
    starting with "bad" are refused by the store."""

    name = "mobile-shop"

    def __init__(self, credits: int = 0) -> None:
        super().__init__(credits)
        self.redeemed: set[tuple[str, str]] = set()

    @property
    def google_play_enabled(self) -> bool:
        return True

    @property
    def apple_storekit_enabled(self) -> bool:
        return True

    async def verify_google_play(self, identity: Identity, purchase: GooglePlayPurchase) -> StoreVerification:
        await self._enter("verify_google_play")
        return self._redeem(identity, ("google", purchase.purchase_token))

    async def verify_app_store(self, identity: Identity, purchase: AppStorePurchase) -> StoreVerification:
        await self._enter("verify_app_store")
        return self._redeem(identity, ("apple", purchase.transaction_id))

    def _redeem(self, identity: Identity, token: tuple[str, str]) -> StoreVerification:
        if token[1].startswith("bad"):
            return StoreVerification(
                success=False, credits_added=0, new_balance=0, already_processed=False, error="Invalid"
            )
        repeat = token in self.redeemed
        self.redeemed.add(token)
        added = 0 if repeat else 100
        self.balances[identity.key] = self.balance(identity) + added
        return StoreVerification(
            success=True,
            credits_added=added,
            new_balance=self.balance(identity),
            already_processed=repeat,
        )


class BrokenProvider(ShopProvider):
    """Fails every call the way an unreachable backend would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = ProviderUnavailable()


def fake_distribution(root: Path, dist: str, module: str, source: str, entry: str) -> None:
    """Lay out an installed distribution (module + .dist-info) the way pip would."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[ciris_billing_proxy.providers]\n{entry}\n")
