"""Give-backs owed: one row per use that must still be given back, until some process made it.

A row holds what the provider needs to give the use back (the user's identity and the request key
it was spent under), when it became owed and why. A process works on a row only under its claim
(`claim` holds the process's token until `claim_expires`), so of any number of processes sharing
the database one makes each give-back at a time; a claim of a process that died expires and is
taken over. Times are the database's clock on PostgreSQL (one clock for every host) and this
host's on SQLite (one host).
"""

from __future__ import annotations

import abc
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..identity import Identity
from .choose import for_engine
from .engine import Engine, RecordStore, Schema
from .postgres import PostgresDatabase
from .sqlite import SQLiteDatabase, transaction

_COLUMNS = """
    namespace    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    request_key  TEXT NOT NULL,
    role         TEXT NOT NULL,
    email        TEXT,
    tenant       TEXT,
    why          TEXT NOT NULL,
    owed_since   {real} NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    claim        TEXT,
    claim_expires {real} NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, user_id, request_key)
"""

SQLITE_SCHEMA = Schema(
    "give_backs",
    ((f"CREATE TABLE IF NOT EXISTS give_backs ({_COLUMNS.format(real='REAL')})",),),
)

POSTGRES_SCHEMA = Schema(
    "give_backs",
    ((f"CREATE TABLE give_backs ({_COLUMNS.format(real='DOUBLE PRECISION')})",),),
)


@dataclass(frozen=True, slots=True)
class Owed:
    """A use still to be given back: the identity it was spent by (all a provider's `give_back`
    reads of it), the request key, when it became owed (Unix time) and why."""

    identity: Identity
    request_key: str
    why: str
    owed_since: float
    attempts: int = 0

    @property
    def slot(self) -> tuple[tuple[str, str], str]:
        return (self.identity.key, self.request_key)

    def to_json(self) -> dict[str, object]:
        who = self.identity
        return {
            "namespace": who.namespace,
            "user_id": who.user_id,
            "role": who.role,
            "email": who.email,
            "tenant": who.tenant,
            "request_key": self.request_key,
            "why": self.why,
            "owed_since": self.owed_since,
        }

    @classmethod
    def from_json(cls, row: dict[str, object]) -> Owed:
        """`ValueError` for a row that is not one `to_json` writes."""
        text = {name: row.get(name) for name in ("namespace", "user_id", "role", "request_key", "why")}
        optional = {name: row.get(name) for name in ("email", "tenant")}
        since = row.get("owed_since")
        if (
            not all(isinstance(value, str) for value in text.values())
            or not all(value is None or isinstance(value, str) for value in optional.values())
            or isinstance(since, bool)
            or not isinstance(since, int | float)
        ):
            raise ValueError("not an owed give-back")
        return cls(
            Identity(str(text["user_id"]), str(text["namespace"]), str(text["role"]), **optional),  # type: ignore[arg-type]
            str(text["request_key"]),
            str(text["why"]),
            float(since),
        )


class GiveBackStore(RecordStore, abc.ABC):
    """Opened and closed with the outbox that owns it; `open` brings the schema up to date."""

    @abc.abstractmethod
    async def add(self, owed: Iterable[Owed], claim: str | None, lease_seconds: float) -> None:
        """Keep these (claimed by `claim` for `lease_seconds`, or unclaimed); a row already kept
        for the same user and request key stays as it is."""

    @abc.abstractmethod
    async def claim(self, token: str, lease_seconds: float, limit: int) -> list[Owed]:
        """Claim up to `limit` rows nobody holds a live claim on, for `token`; each claim counts
        as an attempt."""

    @abc.abstractmethod
    async def renew(self, token: str, lease_seconds: float) -> None:
        """Extend every claim `token` holds (the process is alive and still working on them)."""

    @abc.abstractmethod
    async def release(self, token: str) -> None:
        """Give up every claim `token` holds (at shutdown: the next process takes them at once)."""

    @abc.abstractmethod
    async def remove(self, slots: Iterable[tuple[tuple[str, str], str]]) -> None:
        """Forget these give-backs: they were made (or can never be)."""

    @abc.abstractmethod
    async def all(self) -> list[Owed]:
        """Every row, oldest first."""


def give_back_store(engine: Engine) -> GiveBackStore:
    return for_engine(engine, "give-back store", sqlite=SQLiteGiveBackStore, postgres=PostgresGiveBackStore)


_SELECT = (
    "SELECT namespace, user_id, role, email, tenant, request_key, why, owed_since, attempts FROM give_backs"
)


def _owed(row: tuple[object, ...] | sqlite3.Row) -> Owed:
    namespace, user_id, role, email, tenant, request_key, why, since, attempts = tuple(row)
    identity = Identity(
        str(user_id),
        str(namespace),
        str(role),
        email=None if email is None else str(email),
        tenant=None if tenant is None else str(tenant),
    )
    return Owed(identity, str(request_key), str(why), float(str(since)), int(str(attempts)))


def _values(owed: Owed, claim: str | None, expires: float) -> tuple[object, ...]:
    who = owed.identity
    return (
        who.namespace,
        who.user_id,
        owed.request_key,
        who.role,
        who.email,
        who.tenant,
        owed.why,
        owed.owed_since,
        claim,
        expires,
    )


class SQLiteGiveBackStore(GiveBackStore):
    engine: SQLiteDatabase

    schema = SQLITE_SCHEMA

    async def add(self, owed: Iterable[Owed], claim: str | None, lease_seconds: float) -> None:
        rows = list(owed)

        def write(conn: sqlite3.Connection) -> None:
            expires = time.time() + lease_seconds if claim is not None else 0.0
            with transaction(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO give_backs (namespace, user_id, request_key, role, email, tenant,"
                    " why, owed_since, claim, claim_expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_values(row, claim, expires) for row in rows],
                )

        await self.engine.run(write)

    async def claim(self, token: str, lease_seconds: float, limit: int) -> list[Owed]:
        def write(conn: sqlite3.Connection) -> list[Owed]:
            # BEGIN IMMEDIATE: the read and the claim below are one step for every process on the file.
            with transaction(conn):
                now = time.time()
                due = [
                    _owed(row)
                    for row in conn.execute(
                        f"{_SELECT} WHERE claim IS NULL OR claim_expires <= ? ORDER BY owed_since LIMIT ?",
                        (now, limit),
                    ).fetchall()
                ]
                conn.executemany(
                    "UPDATE give_backs SET claim = ?, claim_expires = ?, attempts = attempts + 1"
                    " WHERE namespace = ? AND user_id = ? AND request_key = ?",
                    [(token, now + lease_seconds, *owed.identity.key, owed.request_key) for owed in due],
                )
                return [replace(owed, attempts=owed.attempts + 1) for owed in due]

        return await self.engine.run(write)

    async def renew(self, token: str, lease_seconds: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "UPDATE give_backs SET claim_expires = ? WHERE claim = ?",
                    (time.time() + lease_seconds, token),
                )

        await self.engine.run(write)

    async def release(self, token: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "UPDATE give_backs SET claim = NULL, claim_expires = 0 WHERE claim = ?", (token,)
                )

        await self.engine.run(write)

    async def remove(self, slots: Iterable[tuple[tuple[str, str], str]]) -> None:
        keys = [(namespace, user_id, key) for (namespace, user_id), key in slots]

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(
                    "DELETE FROM give_backs WHERE namespace = ? AND user_id = ? AND request_key = ?", keys
                )

        await self.engine.run(write)

    async def all(self) -> list[Owed]:
        def read(conn: sqlite3.Connection) -> list[Owed]:
            return [_owed(row) for row in conn.execute(f"{_SELECT} ORDER BY owed_since").fetchall()]

        return await self.engine.run(read)


# Times are `EXTRACT(EPOCH FROM clock_timestamp())`: the database server's clock, one for every host.
PG_ADD = """
INSERT INTO give_backs (namespace, user_id, request_key, role, email, tenant, why, owed_since,
                        claim, claim_expires)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
        CASE WHEN $9::text IS NULL THEN 0 ELSE EXTRACT(EPOCH FROM clock_timestamp())::float8 + $10 END)
ON CONFLICT (namespace, user_id, request_key) DO NOTHING
"""

# SKIP LOCKED: two processes claiming at once each take rows the other did not lock, and the
# condition is judged again on the locked row, so a row is claimed by one of them only.
PG_CLAIM = """
UPDATE give_backs AS g
SET claim = $1, claim_expires = EXTRACT(EPOCH FROM clock_timestamp())::float8 + $2, attempts = g.attempts + 1
FROM (
    SELECT namespace, user_id, request_key FROM give_backs
    WHERE claim IS NULL OR claim_expires <= EXTRACT(EPOCH FROM clock_timestamp())::float8
    ORDER BY owed_since
    LIMIT $3
    FOR UPDATE SKIP LOCKED
) AS due
WHERE g.namespace = due.namespace AND g.user_id = due.user_id AND g.request_key = due.request_key
RETURNING g.namespace, g.user_id, g.role, g.email, g.tenant, g.request_key, g.why, g.owed_since,
          g.attempts
"""

PG_RENEW = """
UPDATE give_backs SET claim_expires = EXTRACT(EPOCH FROM clock_timestamp())::float8 + $2 WHERE claim = $1
"""
PG_RELEASE = "UPDATE give_backs SET claim = NULL, claim_expires = 0 WHERE claim = $1"
PG_REMOVE = "DELETE FROM give_backs WHERE namespace = $1 AND user_id = $2 AND request_key = $3"


class PostgresGiveBackStore(GiveBackStore):
    engine: PostgresDatabase

    schema = POSTGRES_SCHEMA

    async def add(self, owed: Iterable[Owed], claim: str | None, lease_seconds: float) -> None:
        rows = [(*_values(row, claim, 0.0)[:-1], lease_seconds) for row in owed]
        async with self.engine.connection() as conn:
            await conn.executemany(PG_ADD, rows)

    async def claim(self, token: str, lease_seconds: float, limit: int) -> list[Owed]:
        async with self.engine.connection() as conn:
            rows = await conn.fetch(PG_CLAIM, token, lease_seconds, limit)
        return sorted((_owed(tuple(row)) for row in rows), key=lambda owed: owed.owed_since)

    async def renew(self, token: str, lease_seconds: float) -> None:
        async with self.engine.connection() as conn:
            await conn.execute(PG_RENEW, token, lease_seconds)

    async def release(self, token: str) -> None:
        async with self.engine.connection() as conn:
            await conn.execute(PG_RELEASE, token)

    async def remove(self, slots: Iterable[tuple[tuple[str, str], str]]) -> None:
        keys = [(namespace, user_id, key) for (namespace, user_id), key in slots]
        async with self.engine.connection() as conn:
            await conn.executemany(PG_REMOVE, keys)

    async def all(self) -> list[Owed]:
        async with self.engine.connection() as conn:
            rows = await conn.fetch(f"{_SELECT} ORDER BY owed_since")
        return [_owed(tuple(row)) for row in rows]
