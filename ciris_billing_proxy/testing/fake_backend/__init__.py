"""A faithful fake of the CIRIS Billing backend, for tests and for trying the paid flow locally."""

from .faults import Fault, FaultKind
from .ledger import APP_STORE_PRODUCTS, GOOGLE_PLAY_PRODUCTS, INVALID_PURCHASE_PREFIX, Pricing
from .server import READ, WRITE, FakeBillingBackend, fake_id_token, new_api_key

__all__ = [
    "APP_STORE_PRODUCTS",
    "GOOGLE_PLAY_PRODUCTS",
    "INVALID_PURCHASE_PREFIX",
    "READ",
    "WRITE",
    "FakeBillingBackend",
    "Fault",
    "FaultKind",
    "Pricing",
    "fake_id_token",
    "new_api_key",
]
