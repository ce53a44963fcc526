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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from ..database_budget import DEFAULT_BUDGET, DatabaseBudget
from ..errors import ProviderUnavailable
from .changes import ChangeFeed, ChangeListener, IdentityKey, deliver, encode_epoch, encode_revocation
from .engine import Schema
from .sqlite import SQLiteDatabase, transaction

logger = logging.getLogger("ciris_billing_proxy")

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
        (
            "CREATE TABLE token_epochs (namespace TEXT NOT NULL, user_id TEXT NOT NULL,"
            " epoch REAL NOT NULL, PRIMARY KEY (namespace, user_id))",
            "CREATE TABLE user_passwords (username TEXT PRIMARY KEY, password_hash TEXT NOT NULL)",
        ),
    ),
)


class SQLiteChangeFeed(ChangeFeed):
    def __init__(self, path: str | Path, budget: DatabaseBudget = DEFAULT_BUDGET) -> None:
        super().__init__()
        self.db = SQLiteDatabase(path, timeout=budget.timeout_seconds)
        self._last_id = 0
        self._pruned_at = 0.0
        self._probe: sqlite3.Connection | None = None
        self._poller: asyncio.Task[None] | None = None

    async def open_store(self) -> None:
        await self.db.open()
        try:
            await self.db.migrate(SCHEMA)
        except BaseException:
            await self.db.close()
            raise

    async def close_store(self) -> None:
        await self.db.close()

    async def _open(self, listener: ChangeListener) -> None:
        await self.open_store()

        def load(
            conn: sqlite3.Connection,
        ) -> tuple[int, list[tuple[bytes, float]], list[tuple[str, str, float]]]:
            (last,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()
            rows = conn.execute(
                "SELECT digest, expires_at FROM revoked_tokens WHERE expires_at > ?", (time.time(),)
            ).fetchall()
            epochs = conn.execute("SELECT namespace, user_id, epoch FROM token_epochs").fetchall()
            return int(last), [(bytes(d), float(e)) for d, e in rows], epochs

        self._last_id, revoked, epochs = await self.db.run(load)
        self.heard_at = time.monotonic()
        for digest, until in revoked:
            listener.token_revoked(digest, until)
        for namespace, user_id, epoch in epochs:
            listener.epoch_moved((str(namespace), str(user_id)), float(epoch))
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
                self.heard_at = time.monotonic()
                if version == seen:
                    continue
                payloads = await self.db.run(self._read_new)
            except (sqlite3.Error, ProviderUnavailable) as exc:
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

    async def ping(self) -> None:
        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT 1").fetchone()

        await self._write(probe)

    async def revoke(self, digest: bytes, until: float) -> None:
        payload = encode_revocation(self.sender, digest, until)

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                now = time.time()
                conn.execute(
                    "INSERT OR IGNORE INTO revoked_tokens (digest, expires_at) VALUES (?, ?)",
                    (digest, until),
                )
                # Expired ones go here too (an index range): the table never holds more than the
                # revocations of live tokens, whether or not credit changes are being published.
                conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now,))
                conn.execute("INSERT INTO changes (payload, at) VALUES (?, ?)", (payload, now))

        await self._write(write)

    async def move_epoch(self, key: IdentityKey, epoch: float) -> None:
        payload = encode_epoch(self.sender, key, epoch)

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT INTO token_epochs (namespace, user_id, epoch) VALUES (?, ?, ?)"
                    " ON CONFLICT (namespace, user_id) DO UPDATE SET epoch = MAX(epoch, excluded.epoch)",
                    (*key, epoch),
                )
                conn.execute("INSERT INTO changes (payload, at) VALUES (?, ?)", (payload, time.time()))

        await self._write(write)

    async def recorded_passwords(self) -> dict[str, str]:
        def read(conn: sqlite3.Connection) -> dict[str, str]:
            return dict(conn.execute("SELECT username, password_hash FROM user_passwords").fetchall())

        try:
            return await self.db.run(read)
        except sqlite3.Error as exc:
            logger.warning("Change feed unavailable (SQLite: %s)", type(exc).__name__)
            raise ProviderUnavailable from None

    async def record_passwords(self, hashes: Mapping[str, str]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(
                    "INSERT OR REPLACE INTO user_passwords (username, password_hash) VALUES (?, ?)",
                    list(hashes.items()),
                )

        await self._write(write)

    async def _write(self, write: Callable[[sqlite3.Connection], None]) -> None:
        try:
            await self.db.run(write)
        except (sqlite3.Error, ProviderUnavailable) as exc:
            logger.warning("Change feed unavailable (SQLite: %s)", type(exc).__name__)
            raise ProviderUnavailable from None
