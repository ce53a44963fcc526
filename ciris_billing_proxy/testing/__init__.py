"""Testing kit for integrators: a faithful fake billing backend, a fake Stripe API (the `stripe`
provider's), a token factory, pytest fixtures."""

from .fake_backend import FakeBillingBackend, Pricing
from .fake_stripe_api import FakeStripeAPI
from .tokens import TokenFactory

__all__ = ["FakeBillingBackend", "FakeStripeAPI", "Pricing", "TokenFactory"]
