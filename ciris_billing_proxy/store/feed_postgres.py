"""The change feed on PostgreSQL: `LISTEN/NOTIFY` (see `changes`).

Each process listens on a connection of its own, outside the pool: the pool skips the session reset
on release (`postgres._keep_session`), so a pooled connection left listening would hand its
notifications to whoever borrows it next. That connection is pinged every `PING_SECONDS` (a network
that drops packets without closing the connection is noticed too), and when it is lost the feed
reconnects with backoff, telling its listener it is down until it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from ..database_budget import DEFAULT_BUDGET, DatabaseBudget
from ..database_url import DatabaseURL
from .changes import (
    MAX_BACKOFF_SECONDS,
    ChangeFeed,
    ChangeListener,
    IdentityKey,
    deliver,
    encode_epoch,
    encode_revocation,
)
from .engine import DatabaseUnavailable, Schema
from .postgres import CONNECT_TIMEOUT_SECONDS, PostgresDatabase

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("ciris_billing_proxy")

CHANNEL: Final = "ciris_billing_changes"
PING_SECONDS: Final = 1.0
#: Publishing is batched, so two connections keep up with any load; the pool of the provider's
#: records is apart, and both fit many processes in PostgreSQL's default of 100 connections.
POOL_SIZE: Final = 2

SCHEMA = Schema(
    "change_feed",
    (
        (
            "CREATE TABLE revoked_tokens (digest BYTEA PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at)",
        ),
        (
            "CREATE TABLE token_epochs (namespace TEXT NOT NULL, user_id TEXT NOT NULL,"
            " epoch DOUBLE PRECISION NOT NULL, PRIMARY KEY (namespace, user_id))",
            "CREATE TABLE user_passwords (username TEXT PRIMARY KEY, password_hash TEXT NOT NULL)",
        ),
    ),
)


class PostgresChangeFeed(ChangeFeed):
    def __init__(self, url: DatabaseURL, budget: DatabaseBudget = DEFAULT_BUDGET) -> None:
        super().__init__()
        self.url = url
        self.db = PostgresDatabase(
            url, max_size=min(POOL_SIZE, budget.pool_size), timeout=budget.timeout_seconds
        )
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        """Whether the feed hears the other processes now (false while it reconnects)."""
        return self._conn is not None

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
        try:
            await self._listen(listener)
        except BaseException as exc:
            await self.db.close()
            if isinstance(exc, Exception) and not isinstance(exc, DatabaseUnavailable):
                raise DatabaseUnavailable(f"cannot use {self.db.describe()}: change feed failed") from None
            raise
        self._watcher = asyncio.create_task(self._watch_forever(listener))

    async def _close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
        await self.db.close()

    async def _listen(self, listener: ChangeListener) -> None:
        """Connect, listen, then (re)load the revocations and epochs: one made before the LISTEN is
        in the table, one made after it arrives as a notification, so none falls between."""
        import asyncpg

        conn = await asyncpg.connect(
            self.url.target, timeout=CONNECT_TIMEOUT_SECONDS, command_timeout=CONNECT_TIMEOUT_SECONDS
        )
        try:
            await conn.add_listener(
                CHANNEL, lambda _c, _pid, _ch, payload: deliver(payload, self.sender, listener)
            )
            # Only the current connection's loss counts: one closed on purpose is no longer current.
            conn.add_termination_listener(lambda c: self._lost.set() if c is self._conn else None)
            rows = await conn.fetch(
                "SELECT digest, expires_at FROM revoked_tokens WHERE expires_at > $1", time.time()
            )
            epochs = await conn.fetch("SELECT namespace, user_id, epoch FROM token_epochs")
        except BaseException:
            conn.terminate()
            raise
        for digest, until in rows:
            listener.token_revoked(bytes(digest), float(until))
        for namespace, user_id, epoch in epochs:
            listener.epoch_moved((str(namespace), str(user_id)), float(epoch))
        self._lost.clear()
        self._conn = conn
        self.heard_at = time.monotonic()

    async def _watch_forever(self, listener: ChangeListener) -> None:
        while True:
            await self._until_lost()
            logger.warning("Change feed connection lost; reconnecting")
            listener.feed_down()
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.terminate()
            delay = 0.1
            while True:
                try:
                    await self._listen(listener)
                    break
                except Exception:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_SECONDS)
            logger.warning("Change feed reconnected")
            listener.feed_up()

    async def _until_lost(self) -> None:
        """Returns once the listening connection is closed, or fails or misses a ping."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), PING_SECONDS)
                return
            except TimeoutError:
                pass
            conn = self._conn
            if conn is None:
                return
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), PING_SECONDS)
            except Exception:
                return
            self.heard_at = time.monotonic()

    async def _publish(self, payloads: list[str]) -> None:
        async with self.db.connection() as conn:
            await conn.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CHANNEL, payloads)

    async def ping(self) -> None:
        async with self.db.connection() as conn:
            await conn.fetchval("SELECT 1")

    def connections_in_use(self) -> int:
        return self.db.connections_in_use()

    async def revoke(self, digest: bytes, until: float) -> None:
        # One statement: the row and the notification commit together, and expired rows go.
        async with self.db.connection() as conn:
            await conn.execute(
                "WITH added AS (INSERT INTO revoked_tokens (digest, expires_at) VALUES ($1, $2)"
                " ON CONFLICT (digest) DO NOTHING),"
                " pruned AS (DELETE FROM revoked_tokens WHERE expires_at < $3)"
                " SELECT pg_notify($4, $5)",
                digest,
                until,
                time.time(),
                CHANNEL,
                encode_revocation(self.sender, digest, until),
            )

    async def move_epoch(self, key: IdentityKey, epoch: float) -> None:
        # One statement: the row and the notification commit together.
        async with self.db.connection() as conn:
            await conn.execute(
                "WITH moved AS (INSERT INTO token_epochs (namespace, user_id, epoch) VALUES ($1, $2, $3)"
                " ON CONFLICT (namespace, user_id) DO UPDATE"
                " SET epoch = GREATEST(token_epochs.epoch, EXCLUDED.epoch))"
                " SELECT pg_notify($4, $5)",
                key[0],
                key[1],
                epoch,
                CHANNEL,
                encode_epoch(self.sender, key, epoch),
            )

    async def recorded_passwords(self) -> dict[str, str]:
        async with self.db.connection() as conn:
            rows = await conn.fetch("SELECT username, password_hash FROM user_passwords")
        return {str(name): str(hashed) for name, hashed in rows}

    async def record_passwords(self, hashes: Mapping[str, str]) -> None:
        async with self.db.connection() as conn:
            await conn.executemany(
                "INSERT INTO user_passwords (username, password_hash) VALUES ($1, $2)"
                " ON CONFLICT (username) DO UPDATE SET password_hash = EXCLUDED.password_hash",
                list(hashes.items()),
            )
