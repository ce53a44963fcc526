"""What every engine offers the record stores: open, close, and versioned schemas.

Each kind of record (the usage ledger, payments, a third-party provider's own) has a `Schema` per
engine: numbered steps, each applied once, in order, and recorded in the `schema_version` table.
Applying them is atomic and serialised between processes (a SQLite write lock, a PostgreSQL
advisory lock), so any number of processes may start on one database at once.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError


class DatabaseUnavailable(ConfigError):
    """The database cannot be reached, or its schema cannot be used, at startup (never on a request:
    an outage while serving is a `ProviderUnavailable`, answered 503)."""


@dataclass(frozen=True, slots=True)
class Schema:
    """`steps[n]` brings the record kind `name` from version n to version n + 1."""

    name: str
    steps: tuple[tuple[str, ...], ...]

    @property
    def version(self) -> int:
        return len(self.steps)


@dataclass(frozen=True, slots=True)
class Migrated:
    name: str
    version: int
    applied: int


class Engine(abc.ABC):
    dialect: ClassVar[str]

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect; `DatabaseUnavailable` when the database cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def migrate(self, schema: Schema) -> Migrated:
        """Apply the steps of `schema` this database has not had yet."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The database, for messages: never a password."""


def newer_schema(schema: Schema, found: int, where: str) -> DatabaseUnavailable:
    return DatabaseUnavailable(
        f"{where} holds {schema.name} records at schema version {found}, newer than this version of "
        f"ciris-billing-proxy knows ({schema.version}): upgrade the package"
    )


class RecordStore:
    """One kind of record kept on one engine. Each engine's implementation of a kind names its own
    `schema`; `open` connects and brings it up to date (any number of processes may at once), and
    `close` lets go of the engine."""

    schema: ClassVar[Schema]

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def open(self) -> Migrated:
        await self.engine.open()
        return await self.engine.migrate(self.schema)

    async def close(self) -> None:
        await self.engine.close()
