"""Persistent state: the engine (`sqlite`) and one module per kind of record kept in it."""

from .payments import Payment, PaymentStore
from .sqlite import SQLiteDatabase, transaction
from .usage import UsageLedger

__all__ = ["Payment", "PaymentStore", "SQLiteDatabase", "UsageLedger", "transaction"]
