"""Every key the package stores on applications and requests, and the lookup of what
`setup_billing` stored, with a clear error when it never ran.

The service is stored once, on the application `setup_billing` was called on; the token verifier is
reached through it, so there is one place that says which key a handler's tokens are checked with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from aiohttp import web

from .models import CreditStatus

if TYPE_CHECKING:
    from .auth import TokenVerifier
    from .gate import GatedSpend
    from .identity import Identity
    from .service import BillingService

#: The billing service of the application `setup_billing` was called on (`billing_service` reads it).
SERVICE_KEY: Final[web.AppKey[BillingService]] = web.AppKey("service")
#: The identity the request's token was verified as, and the verifier that accepted it. Applications
#: mounted inside one another may each verify with their own key: an identity is reused only by the
#: verifier that produced it (see `auth.identity_of_request`).
VERIFIED_KEY: Final[web.RequestKey[tuple[TokenVerifier, Identity]]] = web.RequestKey("verified")
#: The idempotency key the credit gate spent under, for handlers that want to correlate it.
SPEND_KEY: Final = web.RequestKey("spend_key", str)
#: The caller's credit right after the gate's spend, when the provider's spend tells it (the
#: `simple` provider does): a gated handler that reports the credit left answers with it instead of
#: reading it again. Absent when the provider does not tell, or the gate took nothing.
SPENT_STATUS_KEY: Final = web.RequestKey("spent_status", CreditStatus)
#: What the credit gate took for the request (`gate.billing_spend` reads it).
GATED_SPEND_KEY: Final[web.RequestKey[GatedSpend]] = web.RequestKey("gated_spend")


def billing_service(request: web.Request) -> BillingService:
    """The service of the nearest application on `request`'s way that billing is set up on: the
    handler's own, or one it is mounted in."""
    # The handler's own application first (where `serve` sets billing up): one dict lookup, where
    # `config_dict` makes a chain of the applications anew for each request.
    service = request.app.get(SERVICE_KEY)
    if service is not None:
        return service
    try:
        return request.config_dict[SERVICE_KEY]
    except KeyError:
        # A plain KeyError naming a typed key would leave a host wondering what went wrong.
        raise RuntimeError(
            "call setup_billing() first: get_identity() and @credit_gate need it on the "
            "handler's application or on an application that application is mounted in"
        ) from None
