"""A faithful fake of the CIRIS Billing backend, for tests and for trying the paid flow locally."""

from .faults import Fault, FaultKind
from .ledger import Pricing
from .server import READ, WRITE, FakeBillingBackend, new_api_key

__all__ = ["READ", "WRITE", "FakeBillingBackend", "Fault", "FaultKind", "Pricing", "new_api_key"]
