"""Billing events (`balance.low`, `balance.exhausted`, `purchase.succeeded`, `credit.granted`,
`credit.expired`, `credit.clawed_back`), delivered at least once to the host's callback
(`setup_billing(..., on_event=...)`) and, with `events_url`, as signed webhooks (docs/events.md).

A receiver checks each webhook with `verify_signature(body, request.headers["X-CIRIS-Signature"],
secret)` and de-duplicates by the event id.
"""

from ..store.events import EVENT_KINDS
from .model import Event, EventHandler
from .webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, SignatureVerificationError, sign, verify_signature

__all__ = [
    "EVENT_ID_HEADER",
    "EVENT_KINDS",
    "SIGNATURE_HEADER",
    "Event",
    "EventHandler",
    "SignatureVerificationError",
    "sign",
    "verify_signature",
]
