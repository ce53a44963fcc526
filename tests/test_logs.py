"""What `serve` logs (levels, text and JSON lines with time, level, logger, pid and request id, the
access log), request ids, fault lines that stay one line during an outage, and a library that
configures no logging of its own."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ciris_billing_proxy import setup_billing
from ciris_billing_proxy.ops.logs import FaultLog, quiet_lost_connections
from ciris_billing_proxy.ops.request_id import RequestIdFilter, request_id_middleware

from .conftest import ClientFactory, make_config
from .default_paths import CREDITS, LOGIN
from .serving import clean_env, login, serve

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING) ciris_billing_proxy\.(access|audit) "
    r"\[\d+\] \[[^\]]+\] "
)


async def _requests(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        token = await login(session, url, "ann", "pw-of-ann-123")
        headers = {"Authorization": f"Bearer {token}", "X-Request-ID": "trace-42"}
        async with session.get(f"{url}{CREDITS}?access_token=in-the-query", headers=headers) as r:
            assert r.status == 200
            assert r.headers["X-Request-ID"] == "trace-42"
        async with session.get(f"{url}{CREDITS}", headers={"X-Request-ID": 'bad id\t"quoted"'}) as r:
            assert r.status == 401
            assert re.fullmatch(r"[0-9a-f]{8}-\d+", r.headers["X-Request-ID"])


def _json_lines(output: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in output if line.startswith("{")]


async def test_serve_logs_json_lines_with_an_access_log(tmp_path: Path) -> None:
    env = clean_env(CIRIS_BILLING_LOG_FORMAT="json")
    with serve(["--user", "ann:pw-of-ann-123"], tmp_path, env) as server:
        await _requests(server.url)
    lines = _json_lines(server.output)
    access = [line for line in lines if line["logger"] == "ciris_billing_proxy.access"]
    shown = [str(line["message"]).rsplit(" ", 2)[0] for line in access]
    assert shown == [
        f'127.0.0.1 "POST {LOGIN}" 200',
        f'127.0.0.1 "GET {CREDITS}" 200',
        f'127.0.0.1 "GET {CREDITS}" 401',
    ]
    assert all(re.fullmatch(r"\d+ \d+\.\dms", str(line["message"]).split(" ", 4)[-1]) for line in access)
    assert access[1]["request_id"] == "trace-42"
    for line in lines:
        assert set(line) == {"time", "level", "logger", "pid", "request_id", "message"}
        assert line["pid"] == server.process.pid
    audit = [
        json.loads(str(line["message"])) for line in lines if line["logger"] == "ciris_billing_proxy.audit"
    ]
    assert [event["event"] for event in audit] == ["login_ok"]
    assert audit[0]["request_id"] == access[0]["request_id"]
    text = "".join(server.output)
    for secret in ("in-the-query", "pw-of-ann-123", "Bearer"):
        assert secret not in text


async def test_serve_text_lines_level_and_no_access_log(tmp_path: Path) -> None:
    with serve(["--user", "ann:pw-of-ann-123"], tmp_path) as server:
        await _requests(server.url)
    logged = [line for line in server.output if TEXT_LINE.match(line)]
    assert len(logged) == 4  # three requests and one login event
    assert "[trace-42] 127.0.0.1" in "".join(logged)
    for args, env in (
        (["--no-access-log"], clean_env()),
        ([], clean_env(CIRIS_BILLING_NO_ACCESS_LOG="1")),
        (["--log-level", "warning"], clean_env()),
    ):
        with serve(["--user", "ann:pw-of-ann-123", *args], tmp_path, env) as server:
            await _requests(server.url)
        access = [line for line in server.output if "ciris_billing_proxy.access" in line]
        assert access == [], args
        audit = [line for line in server.output if "ciris_billing_proxy.audit" in line]
        assert len(audit) == (0 if "--log-level" in args else 1)


async def test_the_library_configures_no_logging(make_client: ClientFactory, tmp_path: Path) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("ciris_billing_proxy").handlers[:])
    client = await make_client(make_config(tmp_path))
    assert (await client.get(CREDITS)).status == 401
    await client.close()
    assert (list(root.handlers), root.level, logging.getLogger("ciris_billing_proxy").handlers) == before


async def test_a_host_puts_the_request_id_in_its_own_lines(
    aiohttp_client: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host_log = logging.getLogger("host")

    async def hello(request: web.Request) -> web.Response:
        host_log.warning("hello")
        return web.json_response({})

    app = web.Application(middlewares=[request_id_middleware()])
    app.router.add_get("/hello", hello)
    setup_billing(app, make_config(tmp_path), environ={})
    client = await aiohttp_client(app)  # type: ignore[operator]
    caplog.handler.addFilter(RequestIdFilter())
    resp = await client.get("/hello", headers={"X-Request-ID": "from-the-proxy"})
    assert resp.headers["X-Request-ID"] == "from-the-proxy"
    made = (await client.get("/hello")).headers["X-Request-ID"]
    billing = await client.get(CREDITS, headers={"X-Request-ID": "x" * 129})
    assert billing.headers["X-Request-ID"] not in ("x" * 129, made)
    assert [r.request_id for r in caplog.records if r.name == "host"] == ["from-the-proxy", made]  # type: ignore[attr-defined]


async def test_a_repeated_fault_is_one_line_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    faults = FaultLog(logging.getLogger("ciris_billing_proxy.test"), window=0.2)
    for attempt in range(3962):
        faults.warning("PostgreSQL unavailable: %s", f"attempt {attempt}")
    faults.error("Another fault")
    assert [r.getMessage() for r in caplog.records] == ["PostgreSQL unavailable: attempt 0", "Another fault"]
    await asyncio.sleep(0.3)  # the count comes once the window is over, without another occurrence
    assert caplog.records[-1].getMessage() == "PostgreSQL unavailable … 3,961 more in the last 0.2 s"
    assert caplog.records[-1].levelno == logging.WARNING
    faults.warning("PostgreSQL unavailable: %s", "again")
    assert caplog.records[-1].getMessage() == "PostgreSQL unavailable: again"
    assert len(caplog.records) == 4


async def _abandoned_connects(attempts: int) -> None:
    """asyncpg connection attempts, each cancelled while connecting, to a database that is gone
    behind a proxy (which accepts, then drops, each connection)."""
    import asyncpg

    async def gone(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(random.random() * 0.002)
        writer.transport.abort()

    server = await asyncio.start_server(gone, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for _ in range(attempts):
        attempt = asyncio.ensure_future(asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/test"))
        await asyncio.sleep(random.random() * 0.003)
        attempt.cancel()
        await asyncio.gather(attempt, return_exceptions=True)
    server.close()
    await server.wait_closed()
    gc.collect()
    await asyncio.sleep(0.05)


async def test_connections_lost_during_an_outage_are_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quiet_lost_connections)
    try:
        await _abandoned_connects(300)
    finally:
        loop.set_exception_handler(None)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    other = {"message": "something else", "exception": ValueError("not ours")}
    quiet_lost_connections(loop, other)  # anything else still goes to the default handler
    assert caplog.records[-1].levelno == logging.ERROR
