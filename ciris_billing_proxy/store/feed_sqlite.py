"""The change feed on one SQLite file, for processes sharing a host (see `changes`).

A change is a row of the `changes` table; each process polls for rows newer than the last it read.
The poll is cheap when nothing changed, which is nearly always: every `POLL_SECONDS` the event loop
asks a connection of its own for `PRAGMA data_version` (a counter SQLite bumps when another
connection commits; it reads shared memory, no disk, no table), and only when that moved does the
database thread read the new rows. Rows older than `KEEP_SECONDS` are pruned by the publishers.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..errors import ProviderUnavailable
from ..ops.logs import FaultLog
from .changes import ChangeFeed, ChangeListener, deliver, encode_revocation
from .engine import Schema
from .sqlite import SQLiteDatabase, transaction

logger = logging.getLogger("ciris_billing_proxy")
#: Fault lines an outage repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logger)

POLL_SECONDS: Final = 0.05
#: Far longer than any poll takes, so no process misses a row by its pruning.
KEEP_SECONDS: Final = 60.0
PRUNE_EVERY_SECONDS: Final = 10.0

SCHEMA = Schema(
    "change_feed",
    (
        (
            "CREATE TABLE IF NOT EXISTS changes (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " payload TEXT NOT NULL, at REAL NOT NULL)",
            "CREATE INDEX IF NOT EXISTS changes_at ON changes (at)",
            "CREATE TABLE IF NOT EXISTS revoked_tokens (digest BLOB PRIMARY KEY, expires_at REAL NOT NULL)",
            "CREATE INDEX IF NOT EXISTS revoked_tokens_expiry ON revoked_tokens (expires_at)",
        ),
    ),
)


class SQLiteChangeFeed(ChangeFeed):
    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.db = SQLiteDatabase(path)
        self._last_id = 0
        self._pruned_at = 0.0
        self._probe: sqlite3.Connection | None = None
        self._poller: asyncio.Task[None] | None = None

    async def _open(self, listener: ChangeListener) -> None:
        await self.db.open()
        await self.db.migrate(SCHEMA)

        def load(conn: sqlite3.Connection) -> tuple[int, list[tuple[bytes, float]]]:
            (last,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()
            rows = conn.execute(
                "SELECT digest, expires_at FROM revoked_tokens WHERE expires_at > ?", (time.time(),)
            ).fetchall()
            return int(last), [(bytes(d), float(e)) for d, e in rows]

        self._last_id, revoked = await self.db.run(load)
        for digest, until in revoked:
            listener.token_revoked(digest, until)
        self._probe = sqlite3.connect(self.db.path, isolation_level=None, check_same_thread=False)
        self._poller = asyncio.create_task(self._poll_forever(listener, self._probe))

    async def _close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()
        await self.db.close()

    async def _poll_forever(self, listener: ChangeListener, probe: sqlite3.Connection) -> None:
        seen: object = None
        down = False
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                version = probe.execute("PRAGMA data_version").fetchone()[0]
                if version == seen:
                    continue
                payloads = await self.db.run(self._read_new)
            except sqlite3.Error as exc:
                if not down:
                    logger.warning("Change feed unavailable (SQLite: %s)", type(exc).__name__)
                    listener.feed_down()
                    down = True
                continue
            if down:
                listener.feed_up()
                down = False
            seen = version
            for payload in payloads:
                deliver(payload, self.sender, listener)

    def _read_new(self, conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute(
            "SELECT id, payload FROM changes WHERE id > ? ORDER BY id", (self._last_id,)
        ).fetchall()
        if rows:
            self._last_id = rows[-1][0]
        return [payload for _, payload in rows]

    async def _publish(self, payloads: list[str]) -> None:
        now = time.time()
        prune = now - self._pruned_at > PRUNE_EVERY_SECONDS

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(
                    "INSERT INTO changes (payload, at) VALUES (?, ?)", [(p, now) for p in payloads]
                )
                if prune:
                    conn.execute("DELETE FROM changes WHERE at < ?", (now - KEEP_SECONDS,))
                    conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now,))

        await self._write(write)
        if prune:
            self._pruned_at = now

    async def revoke(self, digest: bytes, until: float) -> None:
        payload = encode_revocation(self.sender, digest, until)

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO revoked_tokens (digest, expires_at) VALUES (?, ?)",
                    (digest, until),
                )
                conn.execute("INSERT INTO changes (payload, at) VALUES (?, ?)", (payload, time.time()))

        await self._write(write)

    async def _write(self, write: Callable[[sqlite3.Connection], None]) -> None:
        try:
            await self.db.run(write)
        except sqlite3.Error as exc:
            faults.warning("Change feed unavailable (SQLite: %s)", type(exc).__name__)
            raise ProviderUnavailable from None
