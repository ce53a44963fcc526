"""SQLite on one dedicated worker thread.

sqlite3 calls block (a commit waits for the disk), so they run off the event loop; a single worker
thread owns the connection, which serialises this process's writes, and `BEGIN IMMEDIATE` makes each
read-check-write atomic against other processes sharing the file. WAL with `synchronous=NORMAL` keeps
every committed transaction across a process crash or restart.

Every use waits at most `timeout` seconds in all (`BillingConfig.database_timeout_seconds`): in the
worker's queue, then on another process's lock (SQLite's busy timeout, lowered to what is left).
A use that cannot start in time, or finds the file locked or unusable, is `ProviderUnavailable`
(503), logged as one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from ..database_budget import DEFAULT_BUDGET
from ..errors import ProviderUnavailable
from .engine import DatabaseUnavailable, Engine, Migrated, Schema, newer_schema

T = TypeVar("T")

logger = logging.getLogger("ciris_billing_proxy")

MEMORY = ":memory:"
#: How long opening a file waits for another process switching it to WAL.
BUSY_TIMEOUT_MS = 5000
DATABASE_UNAVAILABLE = "database unavailable"


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # Also after a failed COMMIT: a transaction left open would refuse every later BEGIN.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _enter_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL, retrying while the file is locked: when several processes open one new file
    at once (workers starting together), SQLite may answer "database is locked" here at once,
    without waiting in its busy handler, while another one is switching it."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _Late(Exception):
    """A use whose budget was spent before the worker could start it: it was not run."""


class SQLiteDatabase(Engine):
    """One SQLite file (or `:memory:`)."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, *, timeout: float = DEFAULT_BUDGET.timeout_seconds) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._busy_ms = round(timeout * 1000)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"SQLite file {self.path}"

    async def open(self) -> None:
        if self.path != MEMORY:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create it owner-only before SQLite does (its journal files inherit this mode): the
            # ledger names users and, for paid providers, their payments. Only when it does not
            # exist: closing a descriptor of a file drops every POSIX lock this process holds on
            # it, those of SQLite connections already open on it too (another engine on the same
            # `database_url`), after which another process may delete the WAL under them and each
            # side goes on writing a database the other never sees.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ciris-billing-db")
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._executor, self._connect)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        if self.path != MEMORY:
            mode = _enter_wal(conn)
            if str(mode).lower() != "wal":
                logger.warning(
                    "SQLite could not use WAL for %s (got %s): concurrent access may wait on locks",
                    Path(self.path).name,
                    mode,
                )
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    async def migrate(self, schema: Schema) -> Migrated:
        def write(conn: sqlite3.Connection) -> Migrated:
            with transaction(conn):
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (component TEXT NOT NULL,"
                    " version INTEGER NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (component, version))"
                )
                (found,) = conn.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_version WHERE component = ?",
                    (schema.name,),
                ).fetchone()
                if found > schema.version:
                    raise newer_schema(schema, found, self.describe())
                for version in range(found + 1, schema.version + 1):
                    for statement in schema.steps[version - 1]:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (component, version, applied_at) VALUES (?, ?, ?)",
                        (schema.name, version, datetime.now(UTC).isoformat()),
                    )
                return Migrated(schema.name, schema.version, schema.version - found)

        try:
            return await self.run(write)
        except ProviderUnavailable:
            raise DatabaseUnavailable(f"cannot use {self.describe()}: it stayed locked") from None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None or self._conn is None:
            raise RuntimeError("database is not open")
        conn = self._conn
        deadline = time.monotonic() + self.timeout
        # Shielded: once a write is handed to the worker it completes, even if the request that
        # asked for it is cancelled, so the caller's view and the file never disagree.
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._within, fn, conn, deadline)
        try:
            return await asyncio.shield(future)
        except sqlite3.OperationalError as exc:  # locked past the budget, a full disk, a lost file
            logger.warning("SQLite unavailable: %s", exc)
            raise ProviderUnavailable(DATABASE_UNAVAILABLE) from None
        except _Late:
            logger.warning("SQLite unavailable: no turn within %g s", self.timeout)
            raise ProviderUnavailable(DATABASE_UNAVAILABLE, maybe_applied=False) from None

    def _within(self, fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection, deadline: float) -> T:
        """`fn` on the worker, within what is left of the budget: not started once it is spent,
        and waiting on locks no longer than the rest. (Busy timeouts change only for uses that
        queued: on an idle worker this costs one clock read.)"""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Late
        busy = max(round(left * 1000), 1)
        if busy < self._busy_ms * 0.9:
            conn.execute(f"PRAGMA busy_timeout = {busy}")
            try:
                return fn(conn)
            finally:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        return fn(conn)

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)
