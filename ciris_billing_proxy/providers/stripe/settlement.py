"""What happens to a payment after it is started: credited once when it succeeds (whoever sees it first:
the webhook or a status poll, on any process), ended when it fails or is canceled, and clawed back
after a refund or a dispute, never below zero.

* **Credit**: the ledger's `paid` grant under the key `purchase:{payment}` (once per payment whatever
  number of processes try at once), then the payment's mark (`StripePaymentStore.mark_credited`: the
  first wins, with its `purchase.succeeded` event and the uses the owner owes, in one transaction).
  A process that dies in between leaves the grant; the next poll or delivery finds the grant by its
  key and makes the mark. `purchase/status` says `succeeded` only once the mark is made.
* **Clawback**: a refund of part of the price takes back that part of the uses (rounded down: a full
  refund takes all), a dispute takes all, each at most once whatever the order or repetition of the
  events (a payment's `claw_target` only rises). The uses come from the payment's grant first, then
  from the user's other live grants, the last to be spent first; what the balance cannot give is
  recorded as owed, and taken from the user's next purchase when it is credited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

from ...errors import PaymentNotFound
from ...identity import Identity
from ...ledger import Account, Ledger
from ...models import PAYMENT_STATES, PurchaseStatus
from ...store import Payment, PaymentStore
from ...store.stripe_payments import PaymentState, StripePaymentStore
from .api import StripeAPI
from .webhooks import Handled, StripeEvent

logger = logging.getLogger("ciris_billing_proxy.stripe")

#: Steps of a clawback one call makes at most (each raises what was taken; new refunds may land
#: meanwhile): more would be a loop on a broken record.
MAX_CLAW_STEPS: Final = 10
IGNORED: Final = Handled(acted=False)


def owner_of(payment: Payment) -> Identity:
    return Identity(user_id=payment.user_id, namespace=payment.namespace, role="user")


def account_of(payment: Payment) -> Account:
    return Account(payment.namespace, payment.user_id)


@dataclass(frozen=True, slots=True)
class Clawed:
    taken: int
    owed: int


class Settlement:
    def __init__(
        self, api: StripeAPI, ledger: Ledger, payments: PaymentStore, records: StripePaymentStore
    ) -> None:
        self.api = api
        self.ledger = ledger
        self.payments = payments
        self.records = records

    # -- purchase/status ------------------------------------------------------------------------
    async def status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        """The payment's state; without webhooks Stripe is asked, and a success credited here."""
        payment = await self.payments.get(payment_id)
        if payment is None or not payment.owned_by(identity):
            raise PaymentNotFound
        if payment.credited:
            await self._finish(payment)
            assert payment.balance_after is not None
            return PurchaseStatus(
                status="succeeded", credits_added=payment.uses, balance_after=payment.balance_after
            )
        state = await self.records.state(payment_id)
        if state is not None and state.ended == "canceled":
            return PurchaseStatus(status="canceled")
        intent = await self.api.retrieve_intent(payment_id)
        if intent.status == "succeeded":
            return await self.credit(payment)
        if intent.status == "canceled":
            await self.records.end(payment_id, "canceled")
            return PurchaseStatus(status="canceled")
        if intent.status == "requires_payment_method" and intent.last_payment_error:
            await self.records.end(payment_id, "failed")
            return PurchaseStatus(status="failed")
        return PurchaseStatus.model_validate(
            {"status": intent.status if intent.status in PAYMENT_STATES else "unknown"}
        )

    # -- crediting ------------------------------------------------------------------------------
    async def credit(self, payment: Payment) -> PurchaseStatus:
        """Credit a payment Stripe says succeeded, once; its status after."""
        granted = await self.ledger.grant(
            account_of(payment),
            payment.uses,
            "paid",
            source="purchase",
            reason="purchase",
            note=payment.payment_id,
            key=f"purchase:{payment.payment_id}",
        )
        # The fields every provider's purchase.succeeded has (docs/events.md), then Stripe's own.
        event = {
            "payment_id": payment.payment_id,
            "credits_added": payment.uses,
            "uses": payment.uses,
            "amount_minor": payment.amount_minor,
            "currency": payment.currency,
        }
        marked = await self.records.mark_credited(
            payment.payment_id, granted.grant.id, payment.uses, granted.balance.credits, event
        )
        await self._finish(payment)
        return PurchaseStatus(
            status="succeeded", credits_added=payment.uses, balance_after=marked.balance_after
        )

    async def _finish(self, payment: Payment, reason: str = "refund") -> Clawed:
        """What a credited payment still owes the ledger: the owner's debt it repays, and the
        clawbacks recorded before it was credited (or left half-done by a process that stopped)."""
        state = await self.records.state(payment.payment_id)
        if state is None or state.grant_id is None:
            return Clawed(0, 0)
        taken = owed = 0
        if state.repay:
            done = await self.ledger.claw_back(
                account_of(payment),
                state.repay,
                reason="correction",
                note=f"owed after a refund or dispute, repaid from {payment.payment_id}",
                grant_id=state.grant_id,
                key=f"repay:{payment.payment_id}",
                partial=True,
            )
            await self.records.finish_repay(payment.payment_id, state.repay - done.taken)
        for _ in range(MAX_CLAW_STEPS):
            if state.claw_pending is not None:
                to = state.claw_pending  # begun, maybe by a process that stopped: done again, once
            elif state.claw_target > state.clawed:
                to = state.claw_target
                if not await self.records.begin_claw(payment.payment_id, state.clawed, to):
                    state = await self._state(payment)  # another step began meanwhile
                    continue
            else:
                break
            amount = to - state.clawed
            done = await self.ledger.claw_back(
                account_of(payment),
                amount,
                reason=reason,
                note=payment.payment_id,
                grant_id=state.grant_id,
                key=f"claw:{payment.payment_id}:{state.clawed}:{to}",
                partial=True,
            )
            await self.records.finish_claw(payment.payment_id, state.clawed, to, amount - done.taken)
            taken, owed = taken + done.taken, owed + amount - done.taken
            state = await self._state(payment)
        return Clawed(taken, owed)

    async def _state(self, payment: Payment) -> PaymentState:
        state = await self.records.state(payment.payment_id)
        assert state is not None  # a credited payment has its row
        return state

    # -- webhooks -------------------------------------------------------------------------------
    async def handle(self, event: StripeEvent) -> Handled:
        obj = event.data.object
        if event.type.startswith("payment_intent."):
            payment = await self._ours(obj.get("id"))
            if payment is None:
                return IGNORED
            return await self._intent_event(event.type, obj, payment)
        if event.type in ("charge.refunded", "charge.dispute.created"):
            payment = await self._ours(obj.get("payment_intent"))
            if payment is None:
                return IGNORED
            if event.type == "charge.dispute.created":
                target, reason = payment.uses, "chargeback"
            else:
                refunded = min(_amount(obj.get("amount_refunded")), payment.amount_minor)
                target, reason = payment.uses * refunded // payment.amount_minor, "refund"
            await self.records.raise_claw_target(payment.payment_id, target)
            # Before the credit, nothing to take yet: crediting takes it (`_finish`).
            clawed = await self._finish(payment, reason)
            return Handled(owner_of(payment), payment.payment_id, clawed=clawed.taken, owed=clawed.owed)
        return IGNORED

    async def _intent_event(self, kind: str, intent: dict[str, Any], payment: Payment) -> Handled:
        owner = owner_of(payment)
        if kind == "payment_intent.succeeded":
            if (_amount(intent.get("amount")), str(intent.get("currency", "")).upper()) != (
                payment.amount_minor,
                payment.currency,
            ):
                logger.error(
                    "Stripe says payment %s succeeded for another amount: not credited", payment.payment_id
                )
                return Handled(owner, payment.payment_id, acted=False)
            await self.credit(payment)
            return Handled(owner, payment.payment_id)
        if kind == "payment_intent.payment_failed":
            await self.records.end(payment.payment_id, "failed")
            return Handled(owner, payment.payment_id)
        if kind == "payment_intent.canceled":
            await self.records.end(payment.payment_id, "canceled")
            return Handled(owner, payment.payment_id)
        return Handled(owner, payment.payment_id, acted=False)

    async def _ours(self, payment_id: object) -> Payment | None:
        """The payment, if this agent started it (a Stripe account may serve other sellers too)."""
        if not isinstance(payment_id, str) or not payment_id:
            return None
        return await self.payments.get(payment_id)


def _amount(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
