"""Testing kit for integrators: a faithful fake billing backend, a token factory, pytest fixtures."""

from .fake_backend import FakeBillingBackend, Pricing
from .tokens import TokenFactory

__all__ = ["FakeBillingBackend", "Pricing", "TokenFactory"]
