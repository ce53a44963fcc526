"""A real PostgreSQL for the tests: a fresh database per test, and a TCP proxy to cut it off.

`CIRIS_TEST_POSTGRES_URL` names the server (default: the local one, trust authentication); tests
that need it skip when it cannot be reached, unless `CIRIS_REQUIRE_POSTGRES=1` (CI), which makes
that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from typing import NoReturn

import pytest
from yarl import URL

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    return os.environ.get("CIRIS_TEST_POSTGRES_URL") or DEFAULT_SERVER


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CIRIS_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (CIRIS_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason} (set CIRIS_TEST_POSTGRES_URL to a server)")


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new, empty database on the test server, dropped afterwards."""
    try:
        import asyncpg
    except ImportError:
        unavailable("asyncpg is not installed (pip install -e '.[test]')")
    server = URL(server_url())
    try:
        admin = await asyncpg.connect(str(server), timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        unavailable(f"no server at {server.with_password(None)} ({type(exc).__name__})")
    name = f"ciris_test_{secrets.token_hex(6)}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield str(server.with_path(f"/{name}"))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def fetch(url: str, query: str, *args: object) -> list[tuple[object, ...]]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        return [tuple(row) for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


class TcpProxy:
    """Forwards a local port to the database; `cut()` drops every connection and refuses new ones
    (the server gone), `restore()` listens again on the same port. `stall()` keeps every connection
    open and accepts new ones but forwards nothing (a server or network that stops answering
    without closing anything), `resume()` forwards again what was held."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def url_for(self, database_url: str) -> str:
        return str(URL(database_url).with_host("127.0.0.1").with_port(self.port))

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, server_writer}
        await asyncio.gather(
            _pipe(client_reader, server_writer, self._flowing),
            _pipe(server_reader, client_writer, self._flowing),
            return_exceptions=True,
        )
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
    try:
        while data := await reader.read(65536):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()
