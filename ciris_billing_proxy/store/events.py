"""The event outbox's records: each billing event (`balance.low`, `credit.granted`, ...) kept until it
is delivered.

An event is written in the same transaction as the change it tells of (`add_sqlite` on the
writer's SQLite connection, `add_postgres` on its asyncpg connection), so a committed change always
has its event and a rolled-back one never does. Delivery (the host's callback, signed webhooks)
reads the outbox later, from any process, and marks each event delivered.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from .engine import Schema

if TYPE_CHECKING:
    import asyncpg

#: Every kind an event may have (docs/events.md).
EVENT_KINDS: Final = frozenset(
    {
        "balance.low",
        "balance.exhausted",
        "purchase.succeeded",
        "credit.granted",
        "credit.expired",
        "credit.clawed_back",
    }
)

SQLITE_SCHEMA = Schema(
    "events",
    (
        (
            """CREATE TABLE IF NOT EXISTS billing_events (
                seq             INTEGER PRIMARY KEY,
                event_id        TEXT NOT NULL UNIQUE,
                kind            TEXT NOT NULL,
                namespace       TEXT NOT NULL,
                user_id         TEXT NOT NULL,
                data            TEXT NOT NULL,
                created_at      TEXT NOT NULL,
                attempts        INTEGER NOT NULL DEFAULT 0,
                next_attempt_at REAL NOT NULL DEFAULT 0,
                delivered_at    TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS billing_events_pending "
            "ON billing_events (next_attempt_at) WHERE delivered_at IS NULL",
        ),
    ),
)

POSTGRES_SCHEMA = Schema(
    "events",
    (
        (
            """CREATE TABLE billing_events (
                seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                event_id        TEXT NOT NULL UNIQUE,
                kind            TEXT NOT NULL,
                namespace       TEXT NOT NULL,
                user_id         TEXT NOT NULL,
                data            TEXT NOT NULL,
                created_at      TEXT NOT NULL,
                attempts        INTEGER NOT NULL DEFAULT 0,
                next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
                delivered_at    TEXT
            )""",
            "CREATE INDEX billing_events_pending ON billing_events (next_attempt_at) "
            "WHERE delivered_at IS NULL",
        ),
    ),
)

_INSERT: Final = "INSERT INTO billing_events (event_id, kind, namespace, user_id, data, created_at) VALUES "


def new_event_id() -> str:
    """A receiver de-duplicates by this id: unique across processes and restarts."""
    return "evt_" + secrets.token_hex(12)


def _row(kind: str, namespace: str, user_id: str, data: Mapping[str, Any]) -> tuple[str, ...]:
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    body = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return (new_event_id(), kind, namespace, user_id, body, datetime.now(UTC).isoformat())


def add_sqlite(
    conn: sqlite3.Connection, kind: str, namespace: str, user_id: str, data: Mapping[str, Any]
) -> str:
    """Keep an event in the writer's open transaction; its id."""
    row = _row(kind, namespace, user_id, data)
    conn.execute(_INSERT + "(?, ?, ?, ?, ?, ?)", row)
    return row[0]


async def add_postgres(
    conn: asyncpg.Connection, kind: str, namespace: str, user_id: str, data: Mapping[str, Any]
) -> str:
    """Keep an event in the writer's open transaction (or as a statement of its own); its id."""
    row = _row(kind, namespace, user_id, data)
    await conn.execute(_INSERT + "($1, $2, $3, $4, $5, $6)", *row)
    return row[0]
