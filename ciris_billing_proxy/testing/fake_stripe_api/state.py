"""The fake Stripe's objects and how they change: PaymentIntents, charges, refunds, disputes, and the
event each change makes, as Stripe's API (version 2025) shapes them.

Stripe's test payment methods and test cards decide a confirmation: `pm_card_visa` (or the card
`4242 4242 4242 4242`) succeeds, `pm_card_chargeDeclined` (`4000 0000 0000 0002`) is declined,
`pm_card_chargeDeclinedInsufficientFunds` (`4000 0000 0000 9995`) has insufficient funds, and
`pm_card_createDispute` (`4000 0000 0000 0259`) succeeds and is disputed at once. A declined
PaymentIntent goes back to `requires_payment_method`, as Stripe's does, and can be paid again.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final

#: Test payment method -> the decline it gets (None: it succeeds).
PAYMENT_METHODS: Final[dict[str, tuple[str, str] | None]] = {
    "pm_card_visa": None,
    "pm_card_mastercard": None,
    "pm_card_createDispute": None,
    "pm_card_chargeDeclined": ("generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": ("insufficient_funds", "Your card has insufficient funds."),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", "Your card has expired."),
}
#: Test card number -> its test payment method.
CARDS: Final = {
    "4242424242424242": "pm_card_visa",
    "5555555555554444": "pm_card_mastercard",
    "4000000000000259": "pm_card_createDispute",
    "4000000000000002": "pm_card_chargeDeclined",
    "4000000000009995": "pm_card_chargeDeclinedInsufficientFunds",
    "4000000000000069": "pm_card_chargeDeclinedExpiredCard",
}
CONFIRMABLE: Final = frozenset({"requires_payment_method", "requires_confirmation"})
CANCELABLE: Final = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})
API_VERSION: Final = "2025-10-29.clover"


class StripeError(Exception):
    """An answer in Stripe's error shape: `{"error": {"type", "code", "message", ...}}`."""

    def __init__(self, status: int, kind: str, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"type": kind, "message": message, **extra}
        if code is not None:
            self.body["code"] = code


def missing(kind: str, object_id: str) -> StripeError:
    return StripeError(
        404, "invalid_request_error", f"No such {kind}: '{object_id}'", "resource_missing", param="id"
    )


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Intent:
    id: str
    amount: int
    currency: str
    metadata: dict[str, str]
    description: str | None
    receipt_email: str | None
    client_secret: str
    created: int
    status: str = "requires_payment_method"
    payment_method: str | None = None
    latest_charge: str | None = None
    last_payment_error: dict[str, Any] | None = None
    cancellation_reason: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "amount_received": self.amount if self.status == "succeeded" else 0,
            "currency": self.currency,
            "status": self.status,
            "client_secret": self.client_secret,
            "created": self.created,
            "description": self.description,
            "receipt_email": self.receipt_email,
            "metadata": dict(self.metadata),
            "payment_method": self.payment_method,
            "payment_method_types": ["card"],
            "latest_charge": self.latest_charge,
            "last_payment_error": self.last_payment_error,
            "cancellation_reason": self.cancellation_reason,
            "livemode": False,
        }


@dataclass
class Charge:
    id: str
    payment_intent: str
    amount: int
    currency: str
    metadata: dict[str, str]
    created: int
    status: str
    amount_refunded: int = 0
    disputed: bool = False
    failure_code: str | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "charge",
            "amount": self.amount,
            "amount_captured": self.amount if self.status == "succeeded" else 0,
            "amount_refunded": self.amount_refunded,
            "currency": self.currency,
            "created": self.created,
            "metadata": dict(self.metadata),
            "paid": self.status == "succeeded",
            "payment_intent": self.payment_intent,
            "refunded": self.amount_refunded >= self.amount > 0,
            "disputed": self.disputed,
            "status": self.status,
            "failure_code": self.failure_code,
            "livemode": False,
        }


@dataclass
class Event:
    id: str
    type: str
    created: int
    data: dict[str, Any]

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "event",
            "api_version": API_VERSION,
            "created": self.created,
            "type": self.type,
            "data": {"object": self.data},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
        }


@dataclass
class StripeState:
    """Every object of the fake, and the events in the order they happened (`events`).

    Called from one event loop (the server's handlers and the test's own calls alike), so every
    change below is one uninterrupted step."""

    intents: dict[str, Intent] = field(default_factory=dict)
    charges: dict[str, Charge] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    disputes: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    #: Told of each new event (the webhook delivery).
    listeners: list[Any] = field(default_factory=list)

    def _emit(self, kind: str, data: dict[str, Any]) -> Event:
        event = Event(_id("evt"), kind, int(time.time()), data)
        self.events.append(event)
        for listener in self.listeners:
            listener(event)
        return event

    def create_intent(
        self,
        amount: int,
        currency: str,
        metadata: dict[str, str],
        description: str | None = None,
        receipt_email: str | None = None,
    ) -> Intent:
        if amount < 50:
            raise StripeError(
                400,
                "invalid_request_error",
                "Amount must be at least 50 cents",
                "amount_too_small",
                param="amount",
            )
        intent_id = _id("pi")
        intent = Intent(
            id=intent_id,
            amount=amount,
            currency=currency.lower(),
            metadata=metadata,
            description=description,
            receipt_email=receipt_email,
            client_secret=f"{intent_id}_secret_{secrets.token_hex(12)}",
            created=int(time.time()),
        )
        self.intents[intent_id] = intent
        self._emit("payment_intent.created", intent.view())
        return intent

    def intent(self, intent_id: str) -> Intent:
        intent = self.intents.get(intent_id)
        if intent is None:
            raise missing("payment_intent", intent_id)
        return intent

    def confirm(self, intent_id: str, payment_method: str | None) -> Intent:
        """Pay the PaymentIntent with a test payment method: a `StripeError` 402 (`card_error`) for a
        decline, after which the PaymentIntent waits for another one."""
        intent = self.intent(intent_id)
        if intent.status not in CONFIRMABLE:
            raise StripeError(
                400,
                "invalid_request_error",
                f"This PaymentIntent's status is {intent.status}, so it cannot be confirmed.",
                "payment_intent_unexpected_state",
                payment_intent=intent.view(),
            )
        method = payment_method or intent.payment_method
        if method is None:
            raise StripeError(
                400,
                "invalid_request_error",
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                "payment_intent_unexpected_state",
            )
        if method not in PAYMENT_METHODS:
            raise missing("payment_method", method)
        intent.payment_method = method
        decline = PAYMENT_METHODS[method]
        charge = Charge(
            id=_id("ch"),
            payment_intent=intent.id,
            amount=intent.amount,
            currency=intent.currency,
            metadata=dict(intent.metadata),
            created=int(time.time()),
            status="failed" if decline else "succeeded",
            failure_code=decline[0] if decline else None,
        )
        self.charges[charge.id] = charge
        intent.latest_charge = charge.id
        if decline is not None:
            code, message = decline
            intent.status = "requires_payment_method"
            intent.last_payment_error = {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": code,
                "message": message,
                "charge": charge.id,
            }
            self._emit("charge.failed", charge.view())
            self._emit("payment_intent.payment_failed", intent.view())
            raise StripeError(
                402,
                "card_error",
                message,
                "card_declined",
                decline_code=code,
                charge=charge.id,
                payment_intent=intent.view(),
            )
        intent.status = "succeeded"
        intent.last_payment_error = None
        self._emit("charge.succeeded", charge.view())
        self._emit("payment_intent.succeeded", intent.view())
        if method == "pm_card_createDispute":
            self.dispute(charge.id)
        return intent

    def confirm_card(self, client_secret: str, number: str) -> Intent:
        """What Stripe.js does with a card typed into its element: the PaymentIntent of the client
        secret, paid with the test card's payment method (an unknown number is declined)."""
        intent_id = client_secret.split("_secret_", 1)[0]
        intent = self.intents.get(intent_id)
        if intent is None or not secrets.compare_digest(intent.client_secret, client_secret):
            raise missing("payment_intent", intent_id)
        return self.confirm(intent_id, CARDS.get(number, "pm_card_chargeDeclined"))

    def cancel(self, intent_id: str, reason: str | None = None) -> Intent:
        intent = self.intent(intent_id)
        if intent.status not in CANCELABLE:
            raise StripeError(
                400,
                "invalid_request_error",
                f"You cannot cancel this PaymentIntent because it has a status of {intent.status}.",
                "payment_intent_unexpected_state",
            )
        intent.status = "canceled"
        intent.cancellation_reason = reason or "requested_by_customer"
        self._emit("payment_intent.canceled", intent.view())
        return intent

    def charge_of(self, intent_id: str | None, charge_id: str | None) -> Charge:
        if charge_id is not None:
            charge = self.charges.get(charge_id)
            if charge is None:
                raise missing("charge", charge_id)
            return charge
        if intent_id is None:
            raise StripeError(
                400,
                "invalid_request_error",
                "One of charge or payment_intent is required.",
                "parameter_missing",
            )
        intent = self.intent(intent_id)
        if intent.status != "succeeded" or intent.latest_charge is None:
            raise StripeError(
                400,
                "invalid_request_error",
                "This PaymentIntent does not have a successful charge to refund.",
                "charge_not_refundable",
            )
        return self.charges[intent.latest_charge]

    def refund(self, charge: Charge, amount: int | None = None) -> dict[str, Any]:
        """Refund `amount` (default: what is left) of a succeeded charge."""
        left = charge.amount - charge.amount_refunded
        amount = left if amount is None else amount
        if charge.status != "succeeded" or amount <= 0 or amount > left:
            raise StripeError(
                400,
                "invalid_request_error",
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                "amount_too_large" if amount > left else "charge_already_refunded",
            )
        charge.amount_refunded += amount
        refund_id = _id("re")
        refund: dict[str, Any] = {
            "id": refund_id,
            "object": "refund",
            "amount": amount,
            "charge": charge.id,
            "payment_intent": charge.payment_intent,
            "currency": charge.currency,
            "status": "succeeded",
            "created": int(time.time()),
            "metadata": {},
        }
        self.refunds[refund_id] = refund
        self._emit("refund.created", dict(refund))
        self._emit("charge.refunded", charge.view())
        return refund

    def dispute(self, charge_id: str, reason: str = "fraudulent") -> dict[str, Any]:
        """The cardholder disputes the whole charge (as `pm_card_createDispute` does at once)."""
        charge = self.charges.get(charge_id)
        if charge is None:
            raise missing("charge", charge_id)
        charge.disputed = True
        dispute_id = _id("dp")
        dispute: dict[str, Any] = {
            "id": dispute_id,
            "object": "dispute",
            "amount": charge.amount,
            "charge": charge.id,
            "payment_intent": charge.payment_intent,
            "currency": charge.currency,
            "reason": reason,
            "status": "needs_response",
            "created": int(time.time()),
            "metadata": {},
        }
        self.disputes[dispute_id] = dispute
        self._emit("charge.dispute.created", dict(dispute))
        return dispute

    def event(self, event_id: str) -> Event:
        for event in self.events:
            if event.id == event_id:
                return event
        raise missing("event", event_id)
