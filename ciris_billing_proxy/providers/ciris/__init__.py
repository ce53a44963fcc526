"""The `ciris` provider: paid credits and Stripe purchases through the CIRIS Billing backend."""

from .provider import CirisProvider, to_credit_status
from .settings import CirisSettings

__all__ = ["CirisProvider", "CirisSettings", "to_credit_status"]
