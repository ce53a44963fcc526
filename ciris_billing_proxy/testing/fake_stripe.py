"""A fake Stripe for the browser, beside the fake billing backend or the fake Stripe API:
`fake-stripe.js` and the confirm call it makes, served by the agent's own process (same origin) so
the page never talks to the billing backend or to Stripe.

    FakeStripe(fake_backend, webhook_delay=2.0).add_routes(app.router)
    FakeStripe(fake_stripe_api).add_routes(app.router)     # serve --provider stripe --fake-stripe

serves `GET /_fake_stripe/stripe.js` (give its URL to `<ciris-billing stripe-js="...">`) and
`POST /_fake_stripe/confirm`, which plays Stripe's test cards against the fake backend:
`4242 4242 4242 4242` succeeds (the webhook credits the purchase `webhook_delay` seconds later),
`4000 0000 0000 0002` is declined and `4000 0000 0000 9995` has insufficient funds; both leave the
PaymentIntent waiting for another card, as Stripe does. Replies use Stripe's error shape
(`{"error": {"type", "code", "message"}}`) beside the package's `{"detail": ...}`. With the fake
Stripe API the card is its test card (`fake_stripe_api.CARDS`), and that fake's webhooks follow.
"""

from __future__ import annotations

import hmac
from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..bodies import read_model
from ..ui import read_file
from .fake_backend import FakeBillingBackend
from .fake_stripe_api import FakeStripeAPI, StripeError

DEFAULT_BASE: Final = "/_fake_stripe"
SUCCEEDS: Final = "4242424242424242"
#: Test card -> (decline_code, message), as Stripe answers them.
DECLINES: Final = {
    "4000000000000002": ("generic_decline", "Your card was declined."),
    "4000000000009995": ("insufficient_funds", "Your card has insufficient funds."),
}
UNKNOWN_CARD: Final = (
    "Your card was declined. This is a fake Stripe in test mode: use a test card such as 4242 4242 4242 4242."
)
CONFIRMABLE: Final = frozenset({"requires_payment_method", "requires_confirmation"})
MAX_BODY: Final = 4096


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class Card(_Body):
    number: str = Field(pattern=r"^[0-9]{12,19}$")
    exp_month: int = Field(ge=1, le=12)
    exp_year: int = Field(ge=2000, le=2199)
    cvc: str = Field(pattern=r"^[0-9]{3,4}$")


class ConfirmRequest(_Body):
    client_secret: str = Field(min_length=1, max_length=512)
    card: Card


def _stripe_error(status: int, kind: str, code: str, message: str, **extra: str) -> web.Response:
    error = {"type": kind, "code": code, "message": message, **extra}
    return web.json_response({"detail": message, "error": error}, status=status)


class FakeStripe:
    def __init__(self, backend: FakeBillingBackend | FakeStripeAPI, *, webhook_delay: float = 2.0) -> None:
        self.backend = backend
        self.webhook_delay = webhook_delay
        self._script = read_file("fake-stripe.js")

    def add_routes(self, router: web.UrlDispatcher, base: str = DEFAULT_BASE) -> str:
        """Add the two routes under `base`; returns the script's path."""
        router.add_get(f"{base}/stripe.js", self.script)
        router.add_post(f"{base}/confirm", self.confirm)
        return f"{base}/stripe.js"

    async def script(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self._script,
            content_type="text/javascript",
            charset="utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    async def confirm(self, request: web.Request) -> web.Response:
        body = await read_model(request, ConfirmRequest, MAX_BODY, time_limit=30.0)
        if isinstance(self.backend, FakeStripeAPI):
            return self._confirm_at_stripe(self.backend, body)
        payment_id = body.client_secret.split("_secret_", 1)[0]
        backend = self.backend
        ledger = backend.ledger
        with ledger.lock:
            intent = ledger.payments.get(payment_id)
            known = intent is not None and hmac.compare_digest(intent.client_secret, body.client_secret)
            status = intent.status if intent is not None else ""
        if not known:
            return _stripe_error(
                404,
                "invalid_request_error",
                "resource_missing",
                "No such payment_intent (bad client secret).",
            )
        if status not in CONFIRMABLE:
            return _stripe_error(
                400,
                "invalid_request_error",
                "payment_intent_unexpected_state",
                f"This PaymentIntent's status is {status}, so it cannot be confirmed.",
            )
        number = body.card.number
        if number == SUCCEEDS:
            backend.confirm_payment(payment_id, webhook_delay=self.webhook_delay)
            return web.json_response({"payment_intent": self._intent(backend, payment_id)})
        backend.fail_payment(payment_id)
        decline_code, message = DECLINES.get(number, ("generic_decline", UNKNOWN_CARD))
        return _stripe_error(402, "card_error", "card_declined", message, decline_code=decline_code)

    @staticmethod
    def _confirm_at_stripe(stripe: FakeStripeAPI, body: ConfirmRequest) -> web.Response:
        try:
            intent = stripe.confirm_card(body.client_secret, body.card.number)
        except StripeError as exc:
            error = exc.body
            extra = {"decline_code": error["decline_code"]} if "decline_code" in error else {}
            return _stripe_error(
                exc.status, error["type"], error.get("code", "card_declined"), error["message"], **extra
            )
        return web.json_response(
            {
                "payment_intent": {
                    "id": intent.id,
                    "object": "payment_intent",
                    "status": intent.status,
                    "amount": intent.amount,
                    "currency": intent.currency,
                }
            }
        )

    @staticmethod
    def _intent(backend: FakeBillingBackend, payment_id: str) -> dict[str, Any]:
        """The PaymentIntent as Stripe.js hands it to the page: no client secret echoed back."""
        view = backend.ledger.payment(payment_id)
        return {
            "id": payment_id,
            "object": "payment_intent",
            "status": view["status"],
            "amount": view["amount_minor"],
            "currency": str(view["currency"]).lower(),
        }
