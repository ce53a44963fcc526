"""A fake Stripe API for tests and the offline demo (`serve --provider stripe --fake-stripe`)."""

from .server import FakeStripeAPI
from .state import CARDS, PAYMENT_METHODS, StripeError, StripeState
from .webhooks import Delivery, WebhookSender, signature

__all__ = [
    "CARDS",
    "PAYMENT_METHODS",
    "Delivery",
    "FakeStripeAPI",
    "StripeError",
    "StripeState",
    "WebhookSender",
    "signature",
]
