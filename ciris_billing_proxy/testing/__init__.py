"""Testing kit for integrators: mint tokens for a `BillingConfig` in your own tests."""

from .tokens import TokenFactory

__all__ = ["TokenFactory"]
