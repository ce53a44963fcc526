"""Persistent state: the engines (`sqlite`, `postgres`) and one module per kind of record kept in
them, each with one implementation per engine behind one interface."""

from .engine import DatabaseUnavailable, Engine, Migrated, Schema
from .payments import Payment, PaymentStore, payment_store
from .postgres import PostgresDatabase
from .replays import ReplayStore, replay_store
from .sqlite import SQLiteDatabase, transaction

__all__ = [
    "DatabaseUnavailable",
    "Engine",
    "Migrated",
    "Payment",
    "PaymentStore",
    "PostgresDatabase",
    "ReplayStore",
    "SQLiteDatabase",
    "Schema",
    "payment_store",
    "replay_store",
    "transaction",
]
