"""Requests aiohttp's parser refuses, sent over raw sockets to a real `serve` process: a JSON 400
that echoes nothing, and no request bytes and no traceback in the server's output."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from ciris_billing_proxy.bad_requests import BadRequestLog

from .serving import Server, serve

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

SECRET = "Hunter2-Passw0rd-do-not-log"
LOGIN_BODY = json.dumps({"username": "ann", "password": SECRET}).encode()
MARKER = "Zq9-oversized-header-marker"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(["--user", f"ann:{SECRET}"], tmp_path_factory.mktemp("serve")) as running:
        yield running


async def exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()


def last_reply(raw: bytes) -> tuple[bytes, bytes]:
    """The head and body of the last response on a connection."""
    head, _, body = raw[raw.rindex(b"HTTP/1.") :].partition(b"\r\n\r\n")
    return head, body


def stopped_output(server: Server) -> str:
    server.process.terminate()
    server.process.wait(15)
    assert server.process.stdout is not None
    return "".join(server.output) + server.process.stdout.read()


async def test_malformed_requests_get_a_json_400_and_leave_no_bytes_in_the_log(server: Server) -> None:
    oversized = f"Bearer {MARKER}{'x' * 9000}"
    raw = await exchange(
        server.url, f"GET /health HTTP/1.1\r\nHost: a\r\nAuthorization: {oversized}\r\n\r\n".encode()
    )
    head, body = last_reply(raw)
    assert head.split(b" ", 2)[1] == b"400"
    assert b"application/json" in head
    assert json.loads(body) == {"detail": "Bad request"}
    assert MARKER.encode() not in raw

    # The second request on a keep-alive connection, with a Content-Length 2 bytes short: the rest of
    # the body is read as the next request's head.
    first = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n"
    login = (
        b"POST /v1/auth/login HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(LOGIN_BODY) - 2}\r\n\r\n".encode()
        + LOGIN_BODY
        + b"\r\n\r\n"
    )
    raw = await exchange(server.url, first + login)
    head, body = last_reply(raw)
    assert head.split(b" ", 2)[1] == b"400"
    assert json.loads(body) == {"detail": "Bad request"}
    assert SECRET.encode()[-8:] not in raw

    output = stopped_output(server)
    assert MARKER not in output
    assert SECRET not in output
    assert SECRET[-8:] not in output
    assert "Traceback" not in output
    assert "malformed HTTP request" in output  # one line says what happened, without the bytes


async def test_a_host_app_with_the_bad_request_log_keeps_request_bytes_out_of_its_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one setting the docs give hosts: `handler_args={"logger": BadRequestLog()}`."""
    app = web.Application(handler_args={"logger": BadRequestLog()})
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                request = f"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {MARKER}{'x' * 9000}\r\n\r\n"
                raw = await exchange(f"http://127.0.0.1:{port}", request.encode())
                assert b" 400 " in raw
    finally:
        await runner.cleanup()
    assert MARKER not in caplog.text
    assert "Traceback" not in caplog.text
    refused = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert len(refused) == 1  # rate-limited: one line for the burst
    assert refused[0].levelno == logging.WARNING
    assert refused[0].exc_info is None


async def test_an_authorization_header_that_is_not_utf8_is_a_json_401(tmp_path: Path) -> None:
    """aiohttp hands such bytes on as lone surrogates: the token check answers them as a token it
    does not know, on the cached read's own handler and on the gate alike."""
    with serve(["--user", f"ann:{SECRET}"], tmp_path) as server:
        await _not_utf8_is_a_json_401(server)


async def _not_utf8_is_a_json_401(server: Server) -> None:
    for request in (
        b"GET /v1/api/billing/credits HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \xff\xfe.a.b\r\n"
        b"Connection: close\r\n\r\n",
        b"POST /v1/agent/interact HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ):
        head, body = last_reply(await exchange(server.url, request))
        assert head.split(b" ", 2)[1] == b"401", head
        assert b"application/json" in head
        assert b"x-request-id" in head.lower()
        assert "detail" in json.loads(body)
