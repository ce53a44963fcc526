"""The `stripe` provider: credit packs sold through the seller's own Stripe account (docs/stripe-provider.md).

Needs the `stripe` library: `pip install 'ciris-billing-proxy[stripe]'`.
"""

try:
    import stripe  # noqa: F401
except ImportError:
    raise ImportError(
        "the stripe provider needs the stripe library: pip install 'ciris-billing-proxy[stripe]'"
    ) from None

from .provider import StripeProvider
from .settings import StripeSettings

__all__ = ["StripeProvider", "StripeSettings"]
