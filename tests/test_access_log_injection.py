"""A request cannot forge, break or bloat an access line: `serve` writes one line per request, its
path (and method, address) with control characters, `"` and `\\` escaped and cut after
`ACCESS_FIELD_LIMIT` characters, as text and as JSON; audit lines stay one JSON object each."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from ciris_billing_proxy.ops.logs import ACCESS_FIELD_LIMIT, loggable

from .serving import clean_env, serve

LONG = 3000
#: Raw (percent-encoded) paths and what the access line must show of each.
HOSTILE = [
    ("/nothing%0AFORGED2%20line", "/nothing\\x0aFORGED2 line"),
    ("/nul%00byte", "/nul\\x00byte"),
    (
        "/cr%0D%0A2026-12-06T12:57:33.230Z%20INFO%20ciris_billing_proxy.audit",
        "/cr\\x0d\\x0a2026-12-06T12:57:33.230Z INFO ciris_billing_proxy.audit",
    ),
    ("/esc%1B%5B31mred", "/esc\\x1b[31mred"),
    ("/quote%22%20200%200%201.0ms", "/quote\\x22 200 0 1.0ms"),
    ("/slash%5Cx0a", "/slash\\x5cx0a"),
    ("/ls%E2%80%A8sep%C2%85nel", "/ls\\u2028sep\\x85nel"),
    ("/caf%C3%A9", "/café"),
    ("/" + "a" * LONG, "/" + "a" * (ACCESS_FIELD_LIMIT - 1) + f"…[+{LONG + 1 - ACCESS_FIELD_LIMIT} chars]"),
]


async def _send_hostile(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for raw, _ in HOSTILE:
            async with session.get(URL(url + raw, encoded=True)) as reply:
                assert reply.status == 404, (raw, reply.status)


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_request_path_cannot_forge_or_break_access_lines(tmp_path: Path, fmt: str) -> None:
    with serve([], tmp_path, clean_env(CIRIS_BILLING_LOG_FORMAT=fmt)) as server:
        await _send_hostile(server.url)
    text = "".join(server.output)
    for raw_character in ("\x00", "\x1b", "\u2028", "\x85"):
        assert raw_character not in text
    lines = text.split("\n")
    assert not [line for line in lines if "FORGED2" in line and "ciris_billing_proxy.access" not in line]
    access = [line for line in lines if "ciris_billing_proxy.access" in line]
    assert len(access) == len(HOSTILE), access
    if fmt == "json":
        shown = [str(json.loads(line)["message"]) for line in access]
    else:
        shown = [line.split("] ", 2)[2] for line in access]
        assert not [line for line in lines if line.startswith("2026-12-06T12:57:33.230Z")]
    for message, (raw, expected) in zip(shown, HOSTILE, strict=True):
        assert message.startswith(f'127.0.0.1 "GET {expected}'), (raw, message)
        # The quoted request ends where the line says, whatever the path held.
        assert message.count('"') == 2, message
        assert len(message) < ACCESS_FIELD_LIMIT + 64


def test_loggable_keeps_a_plain_value_and_escapes_the_rest() -> None:
    plain = "/v1/api/billing/credits"
    assert loggable(plain) is plain
    assert loggable("a\nb\x00c\td\x7fe") == "a\\x0ab\\x00c\\x09d\\x7fe"
    assert loggable('say "hi" \\o/') == "say \\x22hi\\x22 \\x5co/"
    assert loggable("\u2029\U000e0001\ufeff") == "\\u2029\\U000e0001\\ufeff"
    assert loggable("ünïcödé ok") == "ünïcödé ok"
    assert loggable("x" * 10 + "\n", limit=4) == "xxxx…[+7 chars]"
    assert loggable("\n" * 10, limit=2) == "\\x0a\\x0a…[+8 chars]"
    assert loggable("y" * ACCESS_FIELD_LIMIT) == "y" * ACCESS_FIELD_LIMIT
