"""The engine a `database_url` names."""

from __future__ import annotations

from ..database_url import DatabaseURL
from .engine import Engine
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase


def engine_for(url: DatabaseURL) -> Engine:
    if url.dialect == "postgresql":
        return PostgresDatabase(url)
    return SQLiteDatabase(url.target)
