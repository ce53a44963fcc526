"""The change feed on one SQLite file, for processes sharing a host (see `changes`).

A change is a row of the `changes` table; each process polls for rows newer than the last it read.
The poll is cheap when nothing changed, which is nearly always: every `POLL_SECONDS` a timer
callback on the event loop (no task, nothing awaited) asks a connection of its own for
`PRAGMA data_version` (a counter SQLite bumps when another connection commits; it reads shared
memory, no disk, no table), and only when that moved does it read the new rows, on the same
connection: a WAL reader never waits for writers, and the few new rows of a small, hot table cost
less than a round trip through the database thread. Rows older than `KEEP_SECONDS` are pruned by
the publishers.
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
from ..ops.logs import FaultLog
from .changes import ChangeFeed, ChangeListener, IdentityKey, deliver, encode_epoch, encode_revocation
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
        (
            "CREATE TABLE token_epochs (namespace TEXT NOT NULL, user_id TEXT NOT NULL,"
            " epoch REAL NOT NULL, PRIMARY KEY (namespace, user_id))",
            "CREATE TABLE user_passwords (username TEXT PRIMARY KEY, password_hash TEXT NOT NULL)",
        ),
        # Every publish wrote a page of this index besides the table's; pruning walks the table in
        # id order instead (`_PRUNE`).
        ("DROP INDEX IF EXISTS changes_at",),
    ),
)
#: Rows older than `?`: those before the first row that is not (rows are added in id order, with the
#: time they were added), found by walking the table from its oldest row; all of them when none is
#: newer.
_PRUNE = (
    "DELETE FROM changes WHERE id < COALESCE("
    "(SELECT id FROM changes WHERE at >= ?1 ORDER BY id LIMIT 1), (SELECT MAX(id) + 1 FROM changes))"
)


class SQLiteChangeFeed(ChangeFeed):
    publishes_on_loop = True

    def __init__(self, path: str | Path, budget: DatabaseBudget = DEFAULT_BUDGET) -> None:
        super().__init__()
        self.db = SQLiteDatabase(path, timeout=budget.timeout_seconds)
        self._last_id = 0
        self._pruned_at = 0.0
        self._probe: sqlite3.Connection | None = None
        self._poller: asyncio.TimerHandle | None = None
        self._seen: object = None
        self._down = False

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
        # No busy timeout: on the loop it never waits for a lock (see `_look`, `_insert_here`).
        self._probe = sqlite3.connect(self.db.path, isolation_level=None, timeout=0)
        self._probe.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints stay on the database thread
        # Its commits (publishes) run on the loop: no fsync per commit, as on the database thread's
        # connection (WAL with NORMAL survives a process crash; a power cut may lose the newest
        # invalidations, which only make caches fresher).
        self._probe.execute("PRAGMA synchronous = NORMAL")
        self._poller = asyncio.get_running_loop().call_later(POLL_SECONDS, self._poll, listener, self._probe)

    async def _close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()
        await self.db.close()

    def _poll(self, listener: ChangeListener, probe: sqlite3.Connection) -> None:
        """One look for changes, then the next one scheduled (until `_close` cancels it)."""
        try:
            self._look(listener, probe)
        finally:
            if self._poller is not None:
                self._poller = asyncio.get_running_loop().call_later(
                    POLL_SECONDS, self._poll, listener, probe
                )

    def _look(self, listener: ChangeListener, probe: sqlite3.Connection) -> None:
        try:
            version = probe.execute("PRAGMA data_version").fetchone()[0]
            self.heard_at = time.monotonic()
            if version == self._seen:
                return
            payloads = self._read_new(probe)
        except sqlite3.Error as exc:
            if _busy(exc):
                return  # a lock held for an instant (a WAL reset, a recovery): look again next time
            if not self._down:
                logger.warning("Change feed unavailable (SQLite: %s)", type(exc).__name__)
                listener.feed_down()
                self._down = True
            return
        if self._down:
            listener.feed_up()
            self._down = False
        self._seen = version
        for payload in payloads:
            deliver(payload, self.sender, listener)

    def _read_new(self, conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute(
            "SELECT id, payload FROM changes WHERE id > ? ORDER BY id", (self._last_id,)
        ).fetchall()
        if rows:
            self._last_id = rows[-1][0]
        return [payload for _, payload in rows]

    def _publish_now(self, payloads: list[str]) -> bool:
        now = time.time()
        return now - self._pruned_at <= PRUNE_EVERY_SECONDS and self._insert_here(payloads, now)

    async def _publish(self, payloads: list[str]) -> None:
        now = time.time()
        prune = now - self._pruned_at > PRUNE_EVERY_SECONDS
        if not prune and self._insert_here(payloads, now):
            return

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(
                    "INSERT INTO changes (payload, at) VALUES (?, ?)", [(p, now) for p in payloads]
                )
                if prune:
                    conn.execute(_PRUNE, (now - KEEP_SECONDS,))
                    conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now,))

        await self._write(write)
        if prune:
            self._pruned_at = now

    def _insert_here(self, payloads: list[str], now: float) -> bool:
        """Insert the rows with the probe, on the loop, if the write lock is free at once: a WAL
        append, no round trip through the database thread, and (the probe's own commits leave its
        `data_version` as it is) no poll reading them back. False, with nothing written, when
        another connection holds the lock (the probe never waits: no busy timeout) or anything
        fails; the database thread then writes them, and prunes and checkpoints every
        `PRUNE_EVERY_SECONDS` (the probe never checkpoints)."""
        probe = self._probe
        if probe is None:
            return False
        try:
            probe.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return False
        try:
            probe.executemany("INSERT INTO changes (payload, at) VALUES (?, ?)", [(p, now) for p in payloads])
            probe.execute("COMMIT")
        except sqlite3.Error:
            if probe.in_transaction:
                probe.execute("ROLLBACK")
            return False
        return True

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
            faults.warning("Change feed unavailable (SQLite: %s)", type(exc).__name__)
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
            faults.warning("Change feed unavailable (SQLite: %s)", type(exc).__name__)
            raise ProviderUnavailable from None


def _busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
