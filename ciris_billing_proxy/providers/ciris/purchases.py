"""Stripe purchases through the backend: starting one (once), and telling the truth about its status.

* Ownership: each payment started is recorded with its owner in the `PaymentStore`, because the
  backend does not check who asks about a payment.
* Starting: once per key or double click, one at a time per user, at most `purchase_max_per_user`
  per window, in every process (`providers.purchase_starts`, shared with the `stripe` provider).
* Status: Stripe's `succeeded` is `processing` until the webhook's credit for *this* payment shows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from pydantic import ValidationError

from ...errors import InvalidRequest, PaymentNotFound, ProviderUnavailable
from ...identity import Identity
from ...models import PAYMENT_STATES, PurchaseInitiated, PurchaseStatus
from ...store import Payment, PaymentStore
from ...store.replays import ReplayStore
from ..purchase_starts import PurchaseStarts, StartLimits
from .backend import BillingBackend
from .sealing import ReplySeal
from .wire import AWAITING_PAYMENT, BLOCKED, BackendPurchase, to_credit_status

logger = logging.getLogger("ciris_billing_proxy.ciris")

EMAIL_REQUIRED: Final = "Email address required for purchase"
INVALID_PURCHASE: Final = "Invalid purchase request"


class PurchaseDesk:
    """Sells through the backend; starting a purchase once (replays, double clicks, one start at a
    time per user) is `PurchaseStarts`'s."""

    def __init__(
        self, backend: BillingBackend, payments: PaymentStore, replays: ReplayStore, seal: ReplySeal
    ) -> None:
        self.backend = backend
        self.payments = payments
        self.replays = replays
        settings = backend.settings
        limits = StartLimits(
            start_seconds=settings.purchase_timeout_seconds,
            reuse_seconds=settings.purchase_reuse_seconds,
            max_per_user=settings.purchase_max_per_user,
            window_seconds=settings.purchase_window_seconds,
        )
        self.starts = PurchaseStarts(self, payments, replays, seal, limits)

    def start(self) -> None:
        self.starts.start()

    async def aclose(self) -> None:
        await self.starts.aclose()

    async def initiate(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None
    ) -> PurchaseInitiated:
        if not identity.email:
            raise InvalidRequest(EMAIL_REQUIRED)
        return await self.starts.initiate(identity, return_url, idempotency_key)

    async def start_purchase(
        self, identity: Identity, return_url: str | None, pack: str | None
    ) -> PurchaseInitiated:
        return await self._start(identity, return_url)

    async def awaits_payment(self, purchase: PurchaseInitiated, pack: str | None) -> bool:
        """Whether a payment can still be handed back for a double click: only one still waiting
        for the user to pay. One that succeeded, failed or was canceled cannot be paid again, so
        the next click must get a new one; when its state cannot be read, so must it."""
        deadline = self.backend.deadline(self.backend.settings.timeout_seconds)
        try:
            reply = await self.backend.stripe_status(purchase.payment_id, deadline)
        except ProviderUnavailable:
            return False
        return reply.status == 200 and reply.body.get("status") in AWAITING_PAYMENT

    async def _start(self, identity: Identity, return_url: str | None) -> PurchaseInitiated:
        backend = self.backend
        deadline = backend.deadline(backend.settings.purchase_timeout_seconds)
        # A fresh check first: it creates the account the right way (10 free uses; a purchase would
        # create it with 3), refuses suspended or closed accounts (the backend would sell to them),
        # and gives the paid balance against which the webhook's credits are seen.
        before = await backend.check(identity, deadline)
        if before.reason in BLOCKED:
            raise InvalidRequest(f"{before.reason}: purchases are not possible")
        body = backend.accounts.of(identity)
        if return_url:
            body["return_url"] = return_url
        bought = await self._new_payment_intent(body, deadline)
        if await self._replayed(bought):
            # The backend's Stripe idempotency key is `purchase-v3-{account}-{unix second}`: a
            # purchase in the same second as the last one gets that PaymentIntent back, even when
            # it has already been paid. A call a whole second after that reply is in a later second
            # of the backend's clock, whatever its skew from ours, so it makes a new one.
            await asyncio.sleep(1.0)
            bought = await self._new_payment_intent(body, deadline)
            if await self._replayed(bought):
                # Our own starts are one at a time per user (`_latest_or_new`): this is another
                # client of the same backend account, or a backend clock far off. WARNING: a user
                # cannot make it happen at will, but it is no fault of this process either.
                logger.warning("Billing backend purchases answered a PaymentIntent that cannot be paid")
                raise ProviderUnavailable("purchase replayed an ended payment", maybe_applied=False)
        publishable_key = bought.publishable_key or backend.settings.stripe_publishable_key
        if not publishable_key:
            logger.error(
                "No Stripe publishable key: the backend sent none and STRIPE_PUBLISHABLE_KEY is unset"
            )
            raise ProviderUnavailable("no publishable key", maybe_applied=False)
        await self.payments.record(
            bought.payment_id,
            identity,
            uses=bought.uses_purchased,
            amount_minor=bought.amount_minor,
            currency=bought.currency,
            balance_before=max(before.credits_remaining, 0),
        )
        return PurchaseInitiated(
            payment_id=bought.payment_id,
            client_secret=bought.client_secret,
            amount_minor=bought.amount_minor,
            currency=bought.currency,
            uses_purchased=bought.uses_purchased,
            publishable_key=publishable_key,
        )

    async def _new_payment_intent(self, body: dict[str, Any], deadline: float) -> BackendPurchase:
        reply = await self.backend.purchase(body, deadline)
        if reply.status == 400:
            raise InvalidRequest(INVALID_PURCHASE)
        if reply.status != 201:
            raise self.backend.unexpected("purchases", reply)  # a 422 means this proxy sent a bad body
        try:
            return BackendPurchase.model_validate(reply.body)
        except ValidationError:
            logger.error("Billing backend purchases answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed purchase") from None

    async def _replayed(self, bought: BackendPurchase) -> bool:
        """Whether the backend handed back a PaymentIntent it had made before. Stripe replays the
        creation reply (status included) for a repeated idempotency key, so a payment this proxy
        already recorded is the surest sign; a status that cannot be paid is another."""
        return bought.status not in AWAITING_PAYMENT or await self.payments.get(bought.payment_id) is not None

    async def status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        payment = await self.payments.get(payment_id)
        if payment is None or not payment.owned_by(identity):
            raise PaymentNotFound
        if payment.credited:
            assert payment.balance_after is not None
            return PurchaseStatus(
                status="succeeded", credits_added=payment.uses, balance_after=payment.balance_after
            )
        # The status call reaches Stripe synchronously: it gets the purchase budget, shared with
        # the checks that may follow it.
        deadline = self.backend.deadline(self.backend.settings.purchase_timeout_seconds)
        reply = await self.backend.stripe_status(payment_id, deadline)
        if reply.status != 200:
            # We created this payment, so a 404 here is the backend's Stripe error, not a bad id.
            raise self.backend.unexpected("purchase_status", reply)
        stripe_status = reply.body.get("status")
        if stripe_status != "succeeded":
            state = stripe_status if stripe_status in PAYMENT_STATES else "unknown"
            return PurchaseStatus.model_validate({"status": state})
        return await self._succeeded_once_credited(identity, payment, deadline)

    async def _succeeded_once_credited(
        self, identity: Identity, payment: Payment, deadline: float
    ) -> PurchaseStatus:
        """Stripe says succeeded; answer succeeded only once *this payment's* credits show.

        The webhook's credit names the payment (`external_transaction_id`), which is exact even
        when other credits arrive or the user spends meanwhile. Only a backend without the
        transactions listing falls back to the balance having grown by the uses bought."""
        backend = self.backend
        credited = await backend.find_transaction(
            identity,
            "credit",
            lambda t: t.get("external_transaction_id") == payment.payment_id,
            deadline=deadline,
        )
        now = await backend.check(identity, deadline)
        landed = credited is not None or (
            backend.listing_missing and now.credits_remaining >= payment.balance_before + payment.uses
        )
        if landed:
            shown = to_credit_status(now).credits_remaining  # what /credits shows from now on
            balance = await self.payments.mark_credited(payment.payment_id, shown)
            return PurchaseStatus(status="succeeded", credits_added=payment.uses, balance_after=balance)
        first_seen = await self.payments.seen_succeeded(payment.payment_id)
        wait = backend.settings.credit_wait_seconds
        if time.time() - first_seen > wait:
            logger.error(
                "Payment %s succeeded at Stripe but its credits have not landed after %.0f s",
                payment.payment_id,
                wait,
            )
            return PurchaseStatus(status="unknown")
        return PurchaseStatus(status="processing")
