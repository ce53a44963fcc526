"""SQLite on one dedicated worker thread.

sqlite3 calls block (a commit waits for the disk), so they run off the event loop; a single worker
thread owns the connection, which serialises this process's writes, and `BEGIN IMMEDIATE` makes each
read-check-write atomic against other processes sharing the file. WAL with `synchronous=NORMAL` keeps
every committed transaction across a process crash or restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TypeVar

from .engine import Engine, Migrated, Schema, newer_schema

T = TypeVar("T")

logger = logging.getLogger("ciris_billing_proxy")

MEMORY = ":memory:"
BUSY_TIMEOUT_MS = 5000


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


#: A call for the worker thread: what to run with its connection (None before it connects), and the
#: future to settle with the outcome.
_Call = tuple[Callable[[sqlite3.Connection | None], Any], asyncio.Future[Any]]


class SQLiteDatabase(Engine):
    """One SQLite file (or `:memory:`), on a worker thread of its own.

    The thread takes `(fn, future)` pairs from a queue and settles each future on the loop with
    one `call_soon_threadsafe`: a round trip costs a queue put, a thread wake-up and one callback,
    where `run_in_executor` added a `concurrent.futures` future chained to an asyncio one, executor
    locks and a `shield`. Every call handed over runs to its end, in order, even if its caller is
    cancelled meanwhile, so the caller's view and the file never disagree.
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._calls: SimpleQueue[_Call | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._conn: sqlite3.Connection | None = None  # the worker thread's only

    def describe(self) -> str:
        return f"SQLite file {self.path}"

    async def open(self) -> None:
        if self.path != MEMORY:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create it owner-only before SQLite does (its journal files inherit this mode): the
            # ledger names users and, for paid providers, their payments.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="ciris-billing-db", daemon=True)
        self._thread.start()
        try:
            await self._call(self._connect)
        except BaseException:
            self._stop_thread()
            raise
        self._open = True

    def _connect(self, _unused: sqlite3.Connection | None) -> None:
        self._conn = conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if self.path != MEMORY:
            mode = _enter_wal(conn)
            if str(mode).lower() != "wal":
                logger.warning(
                    "SQLite could not use WAL for %s (got %s): concurrent access may wait on locks",
                    Path(self.path).name,
                    mode,
                )
            conn.execute("PRAGMA synchronous = NORMAL")

    def _work(self) -> None:
        """The worker thread: run each call with the connection, settle its future on the loop."""
        loop = self._loop
        assert loop is not None
        while (item := self._calls.get()) is not None:
            fn, future = item
            settle: Callable[[Any, asyncio.Future[Any]], None] = _settle
            try:
                value: Any = fn(self._conn)
            except BaseException as exc:
                settle, value = _fail, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
                loop.call_soon_threadsafe(settle, value, future)

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

        return await self.run(write)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._open:
            raise RuntimeError("database is not open")
        return await self._call(fn)  # type: ignore[arg-type]  # the worker's connection, once open

    def _call(self, fn: Callable[[sqlite3.Connection | None], T]) -> asyncio.Future[T]:
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._calls.put((fn, future))
        return future

    async def close(self) -> None:
        if self._thread is None:
            return
        if self._open:
            self._open = False
            await self._call(self._disconnect)  # after every call handed over before it
        self._stop_thread()

    def _disconnect(self, conn: sqlite3.Connection | None) -> None:
        self._conn = None
        if conn is not None:
            conn.close()

    def _stop_thread(self) -> None:
        """End the worker; it is idle by now (every call handed over has been answered), so the
        join returns at once."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._calls.put(None)
            thread.join()


def _settle(result: Any, future: asyncio.Future[Any]) -> None:
    if not future.done():  # a cancelled caller: the call ran all the same, nobody waits for it
        future.set_result(result)


def _fail(exc: BaseException, future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(exc)
