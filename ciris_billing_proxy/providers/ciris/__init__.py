"""The `ciris` provider: paid credits and Stripe purchases through the CIRIS Billing backend."""

from .provider import CirisProvider
from .settings import CirisSettings
from .wire import to_credit_status

__all__ = ["CirisProvider", "CirisSettings", "to_credit_status"]
