"""PostgreSQL through asyncpg: one bounded pool per engine, every wait bounded.

asyncpg is an optional dependency (`pip install 'ciris-billing-proxy[postgres]'`), imported when an
engine opens. A connection lost while serving (the server restarted, a network cut) is a
`ProviderUnavailable`, answered 503; the pool replaces dead connections on the next request, so
service resumes by itself once the server is back.

One use of a connection (`connection()`: waiting for it, and every statement run on it) takes at
most `timeout` seconds in all (`BillingConfig.database_timeout_seconds`): a server that stops
answering without closing the connection costs a request that budget, not one per statement. The
pool holds at most `max_size` connections (`database_pool_size`), and closing it is bounded too,
so a stalled server cannot hold up a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, ClassVar, Final

from ..database_budget import DEFAULT_BUDGET
from ..database_url import INSTALL_POSTGRES, DatabaseURL
from ..errors import ProviderUnavailable
from ..ops.logs import FaultLog
from .engine import DatabaseUnavailable, Engine, Migrated, Schema, newer_schema

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("ciris_billing_proxy")
#: Fault lines an outage repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logger)

#: Connections per process (default of `database_pool_size`): enough to keep a gate busy (a spend is
#: one round trip), few enough that many processes fit in PostgreSQL's default of 100 connections.
POOL_MAX_SIZE: Final = DEFAULT_BUDGET.pool_size
CONNECT_TIMEOUT_SECONDS: Final = 5.0
#: Longest a pool's close waits for its connections to close politely before it cuts them.
CLOSE_TIMEOUT_SECONDS: Final = 2.0
#: Serialises schema changes between processes (`pg_advisory_xact_lock`); any fixed 64-bit number.
MIGRATION_LOCK: Final = 0x43495249_5342494C
DATABASE_UNAVAILABLE: Final = "database unavailable"


class PostgresDatabase(Engine):
    dialect = "postgresql"
    #: The open pools of this process, for the pool metric only (weakly held: a pool that is
    #: dropped without `close` is not kept alive by it).
    _open: ClassVar[weakref.WeakSet[PostgresDatabase]] = weakref.WeakSet()

    def __init__(
        self,
        url: DatabaseURL,
        *,
        max_size: int = POOL_MAX_SIZE,
        timeout: float = DEFAULT_BUDGET.timeout_seconds,
    ) -> None:
        self.url = url
        self.max_size = max_size
        self.timeout = timeout
        self._pool: asyncpg.Pool | None = None

    def describe(self) -> str:
        return self.url.describe()

    async def open(self) -> None:
        try:
            import asyncpg
        except ImportError:
            raise DatabaseUnavailable(f"PostgreSQL needs the asyncpg driver: {INSTALL_POSTGRES}") from None
        pool = asyncpg.create_pool(
            self.url.target,
            # No floor: connections open on demand. A pool with one reconnects in the background
            # during an outage and logs every failed attempt with a traceback.
            min_size=0,
            max_size=self.max_size,
            timeout=min(CONNECT_TIMEOUT_SECONDS, self.timeout),
            command_timeout=self.timeout,
            reset=_keep_session,
        )
        try:
            await pool
            # Without a floor nothing connects yet: one query proves the database is there.
            await pool.execute("SELECT 1")
        except Exception as exc:
            await pool.close()
            raise DatabaseUnavailable(f"cannot use {self.describe()}: {_reason(exc)}") from None
        self._pool = pool
        PostgresDatabase._open.add(self)

    def connections_in_use(self) -> int:
        """Connections of the pool lent out now."""
        pool = self._pool
        return 0 if pool is None else pool.get_size() - pool.get_idle_size()

    @classmethod
    def connections_in_use_by_process(cls) -> int:
        """Connections lent out now by every open pool of this process: the provider's records, the
        change feed, the give-back outbox, the login throttle and the audit trail each keep one,
        and the metric says what the process holds of the server's connections."""
        return sum(db.connections_in_use() for db in cls._open)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        PostgresDatabase._open.discard(self)
        if pool is None:
            return
        try:
            # Polite first: each connection says goodbye to the server. A stalled server never
            # answers, and a shutdown must not wait for it.
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; losing the server on the way is `ProviderUnavailable` (503)."""
        import asyncpg

        if self._pool is None:
            raise RuntimeError("database is not open")
        pool = self._pool
        try:
            async with asyncio.timeout(self.timeout), pool.acquire() as conn:
                yield conn
        except (
            OSError,
            TimeoutError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.OperatorInterventionError,
            asyncpg.InsufficientResourcesError,  # too many connections, out of disk or memory
            # Refused when a new connection logs in: the database is gone or renamed, or the
            # role's password changed. Nothing a retry of this request can mend, but a 503 all the
            # same (and a shutdown that releases claims goes on), never a traceback.
            asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidAuthorizationSpecificationError,
        ) as exc:
            faults.warning("PostgreSQL unavailable: %s", type(exc).__name__)
            raise ProviderUnavailable(DATABASE_UNAVAILABLE) from None

    async def migrate(self, schema: Schema) -> Migrated:
        try:
            async with self.connection() as conn, conn.transaction():
                return await self._migrate(conn, schema)
        except ProviderUnavailable:
            raise DatabaseUnavailable(f"cannot use {self.describe()}: connection lost") from None

    async def _migrate(self, conn: asyncpg.Connection, schema: Schema) -> Migrated:
        # Taken before anything else, the table creation included: concurrent CREATE TABLE IF NOT
        # EXISTS statements can fail on each other in PostgreSQL.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (component TEXT NOT NULL,"
            " version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
            " PRIMARY KEY (component, version))"
        )
        found = await conn.fetchval(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version WHERE component = $1", schema.name
        )
        if found > schema.version:
            raise newer_schema(schema, found, self.describe())
        for version in range(found + 1, schema.version + 1):
            for statement in schema.steps[version - 1]:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (component, version) VALUES ($1, $2)",
                schema.name,
                version,
            )
        return Migrated(schema.name, schema.version, schema.version - found)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset on release (`RESET ALL`, `UNLISTEN *`, ...: a round trip per use,
    as costly as a spend): the stores leave no session state behind. An open transaction is still
    rolled back by asyncpg before this is called."""


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in words that carry no password (asyncpg's messages name the user
    and host at most; an OSError's text is the system's)."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_SECONDS:g} s"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__
