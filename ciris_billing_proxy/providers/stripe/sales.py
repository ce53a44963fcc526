"""Selling a pack: a PaymentIntent at Stripe, its owner recorded here (the `Seller` of
`providers.purchase_starts`, which makes each start once per key or double click)."""

from __future__ import annotations

from typing import Final

from ...errors import ProviderUnavailable
from ...identity import Identity
from ...models import PurchaseInitiated
from ...store import PaymentStore
from ...store.stripe_payments import StripePaymentStore
from ..packs import Packs
from .api import StripeAPI

#: Stripe's states of a PaymentIntent that still waits for the user (a declined card leaves it in
#: `requires_payment_method` with a `last_payment_error`: that one has failed, for this package).
AWAITING_PAYMENT: Final = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})


class StripeSales:
    def __init__(
        self,
        api: StripeAPI,
        packs: Packs,
        payments: PaymentStore,
        records: StripePaymentStore,
        publishable_key: str,
    ) -> None:
        self.api = api
        self.packs = packs
        self.payments = payments
        self.records = records
        self.publishable_key = publishable_key

    async def start_purchase(
        self, identity: Identity, return_url: str | None, pack: str | None
    ) -> PurchaseInitiated:
        chosen = self.packs.choose(pack)
        intent = await self.api.create_intent(identity, chosen)
        # The provider's own row first: a payment is ours (the status and webhooks follow it) only
        # once its ownership is recorded, and then it has both.
        await self.records.add(intent.id, identity.namespace, identity.user_id)
        await self.payments.record(
            intent.id,
            identity,
            uses=chosen.uses,
            amount_minor=chosen.price_minor,
            currency=chosen.currency,
            balance_before=0,
        )
        return PurchaseInitiated(
            payment_id=intent.id,
            client_secret=intent.client_secret,
            amount_minor=chosen.price_minor,
            currency=chosen.currency,
            uses_purchased=chosen.uses,
            publishable_key=self.publishable_key,
        )

    async def awaits_payment(self, purchase: PurchaseInitiated, pack: str | None) -> bool:
        chosen = self.packs.choose(pack)
        if (purchase.uses_purchased, purchase.amount_minor, purchase.currency) != (
            chosen.uses,
            chosen.price_minor,
            chosen.currency,
        ):
            return False
        state = await self.records.state(purchase.payment_id)
        if state is None or state.ended is not None:
            return False
        try:
            intent = await self.api.retrieve_intent(purchase.payment_id)
        except ProviderUnavailable:
            return False  # unreadable: the click gets a new one
        return intent.status in AWAITING_PAYMENT and not intent.last_payment_error
