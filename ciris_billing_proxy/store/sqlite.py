"""SQLite on the event loop when that costs no wait, else on one dedicated worker thread.

A use runs on the loop itself when nothing is handed to the worker and the write lock is free at
once: the connection's busy timeout is 0 there, so a use finding another process's lock fails at
its first statement, having written nothing, and is handed to the worker, which waits for the lock
within the budget. With WAL and `synchronous=NORMAL` a commit is an append to the WAL, no fsync;
the checkpoints, which do sync, are run by the worker (`CHECKPOINT_USES`), never on the loop. A
use on the loop skips the hand-off (a queue put, a thread wake-up, a callback back to the loop):
about an eighth of a gated interaction's instructions (`bench.instructions`).

The worker thread owns the connection whenever a use is handed to it, which serialises this
process's uses, and `BEGIN IMMEDIATE` makes each read-check-write atomic against other processes
sharing the file. WAL with `synchronous=NORMAL` keeps every committed transaction across a process
crash or restart.

Every use waits at most `timeout` seconds in all (`BillingConfig.database_timeout_seconds`): in the
worker's queue, then on another process's lock (SQLite's busy timeout, lowered to what is left).
A use that cannot start in time, or finds the file locked or unusable, is `ProviderUnavailable`
(503), logged as one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
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

from ..database_budget import DEFAULT_BUDGET
from ..errors import ProviderUnavailable
from ..ops.logs import FaultLog
from .engine import DatabaseUnavailable, Engine, Migrated, Schema, newer_schema

T = TypeVar("T")

logger = logging.getLogger("ciris_billing_proxy")
#: Fault lines an outage repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logger)

MEMORY = ":memory:"
#: How long opening a file waits for another process switching it to WAL.
BUSY_TIMEOUT_MS = 5000
DATABASE_UNAVAILABLE = "database unavailable"
#: A checkpoint of the WAL every this many uses, or at the first use this many seconds after the
#: last one, each run by the worker thread (SQLite's automatic checkpoint is off: it would sync the
#: file on whichever thread committed, the loop included).
CHECKPOINT_USES = 1000
CHECKPOINT_SECONDS = 10.0


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """`BEGIN IMMEDIATE` ... `COMMIT`, with a cursor for the statements in between (one cursor,
    not one made by each `conn.execute`)."""
    cursor = conn.cursor()
    cursor.execute("BEGIN IMMEDIATE")
    try:
        yield cursor
        cursor.execute("COMMIT")
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


#: A call for the worker thread: what to run with its connection (None before it connects), the
#: future to settle with the outcome, and the `time.monotonic()` past which it must not start.
_Call = tuple[Callable[[sqlite3.Connection | None], Any], asyncio.Future[Any], float]


class _Late(Exception):
    """A use whose budget was spent before the worker could start it: it was not run."""


class SQLiteDatabase(Engine):
    """One SQLite file (or `:memory:`), on a worker thread of its own.

    The thread takes `(fn, future, deadline)` calls from a queue and settles each future on the
    loop with one `call_soon_threadsafe`: a round trip costs a queue put, a thread wake-up and one
    callback, where `run_in_executor` added a `concurrent.futures` future chained to an asyncio one,
    executor locks and a `shield`. Every call handed over runs to its end, in order, even if its
    caller is cancelled meanwhile, so the caller's view and the file never disagree; only one whose
    budget was spent before its turn came is not started at all (`_Late`: nothing applied).
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path, *, timeout: float = DEFAULT_BUDGET.timeout_seconds) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._busy_ms = round(timeout * 1000)
        #: A use with less than this left (seconds) has its busy timeout lowered to what is left.
        self._lower_below = timeout * 0.9
        self._calls: SimpleQueue[_Call | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._conn: sqlite3.Connection | None = None
        #: Calls handed to the worker and not yet settled on the loop: the loop uses the
        #: connection itself only while there are none.
        self._handed = 0
        self._uses = 0
        self._checkpoint_at = 0.0

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
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA busy_timeout = 0")  # on the loop, never wait; the worker sets its own

    def _work(self) -> None:
        """The worker thread: run each call with the connection, settle its future on the loop."""
        loop = self._loop
        assert loop is not None
        while (item := self._calls.get()) is not None:
            fn, future, deadline = item
            settle: Callable[[Any, asyncio.Future[Any]], None] = _settle
            try:
                value: Any = self._within(fn, deadline)
            except BaseException as exc:
                settle, value = _fail, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
                loop.call_soon_threadsafe(settle, value, future)

    def _within(self, fn: Callable[[sqlite3.Connection | None], T], deadline: float) -> T:
        """`fn` on the worker, within what is left of its budget: not started once it is spent, and
        waiting on locks no longer than the rest."""
        conn = self._conn
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Late
        if conn is None or left == math.inf:
            return fn(conn)
        wait_ms = self._busy_ms if left >= self._lower_below else max(round(left * 1000), 1)
        conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            return fn(conn)
        finally:
            conn.execute("PRAGMA busy_timeout = 0")

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
        if not self._open:
            raise RuntimeError("database is not open")
        self._uses += 1
        if self._uses >= CHECKPOINT_USES or time.monotonic() >= self._checkpoint_at:
            self._checkpoint()
        conn = self._conn
        try:
            if self._handed == 0 and conn is not None:
                changes = conn.total_changes
                try:
                    return fn(conn)
                except sqlite3.OperationalError:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    if conn.total_changes != changes:
                        raise  # written in part (statements outside a transaction): never run twice
                    # Locked by another process (or unusable): the worker waits for the lock
                    # within the budget, or meets the fault again and reports it.
            return await self._call(fn, time.monotonic() + self.timeout)  # type: ignore[arg-type]
        except sqlite3.OperationalError as exc:  # locked past the budget, a full disk, a lost file
            faults.warning("SQLite unavailable: %s", exc)
            raise ProviderUnavailable(DATABASE_UNAVAILABLE) from None
        except _Late:
            faults.warning("SQLite unavailable: no turn within %g s", self.timeout)
            raise ProviderUnavailable(DATABASE_UNAVAILABLE, maybe_applied=False) from None

    def _call(
        self, fn: Callable[[sqlite3.Connection | None], T], deadline: float = math.inf
    ) -> asyncio.Future[T]:
        """Hand `fn` to the worker (`deadline`: a budgeted use's; none for opening and closing)."""
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._handed += 1
        future.add_done_callback(self._settled)
        self._calls.put((fn, future, deadline))
        return future

    def _settled(self, _future: asyncio.Future[Any]) -> None:
        self._handed -= 1

    def _checkpoint(self) -> None:
        """Hand a passive checkpoint of the WAL to the worker (never waiting for readers or
        writers: what it cannot copy now, a later one does)."""
        self._uses = 0
        self._checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS

        def checkpoint(conn: sqlite3.Connection | None) -> None:
            if conn is not None and self.path != MEMORY:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

        self._call(checkpoint).add_done_callback(_checkpointed)

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


def _checkpointed(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        faults.warning("SQLite checkpoint failed: %s", type(future.exception()).__name__)


def _settle(result: Any, future: asyncio.Future[Any]) -> None:
    if not future.done():  # a cancelled caller: the call ran all the same, nobody waits for it
        future.set_result(result)


def _fail(exc: BaseException, future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(exc)
