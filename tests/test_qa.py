"""`ciris-billing-proxy qa` as a subprocess: against the demo in both modes, and a broken server."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from .serving import clean_env, serve

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


async def qa(*args: str) -> tuple[int, str, str]:
    """Run the command without blocking the loop (a test's own server may be serving on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ciris_billing_proxy",
        "qa",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def results(table: str) -> dict[str, str]:
    return {
        m.group(1).strip(): m.group(2) for m in re.finditer(r"^(.+?)\s{2,}(PASS|SKIP|FAIL)\s", table, re.M)
    }


async def test_simple_demo_passes_with_purchase_skipped(tmp_path: Path) -> None:
    with serve(["--user", "ann:pw:ann@example.com"], tmp_path) as server:
        code, out, err = await qa("--url", server.url, "--username", "ann", "--password", "pw")
    assert code == 0, out + err
    assert results(out) == {
        "Get Credit Status": "PASS",
        "Check Credit Balance Display": "PASS",
        "Check Purchase Options": "PASS",
        "Initiate Purchase": "SKIP",
        "Check Purchase Status": "SKIP",
        "Get Transaction History": "PASS",
    }
    assert "billing not enabled" in out
    assert "... Get Credit Status" in err  # progress goes to stderr


async def test_ciris_demo_passes_every_step_and_reports_json(tmp_path: Path) -> None:
    with serve(["--fake-backend", "--user", "ann:pw:ann@example.com"], tmp_path) as server:
        code, out, _ = await qa(
            "--url",
            server.url,
            "--username",
            "ann",
            "--password",
            "pw",
            "--return-url",
            "https://ui.example/done",
            "--json",
        )
        assert code == 0, out
        report = json.loads(out)
        assert report["passed"] is True
        assert [s["result"] for s in report["steps"]] == ["PASS"] * 6
        assert "_secret_" not in out  # the client secret is never printed
        code, out, _ = await qa("--url", server.url, "--username", "ann", "--password", "pw", "--no-purchase")
        assert code == 0
        assert results(out)["Initiate Purchase"] == "SKIP"


async def test_a_server_that_breaks_the_contract_fails(aiohttp_server: Any) -> None:
    async def login(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "access_token": "t",
                "token_type": "Bearer",
                "expires_in": 60,
                "user_id": "u",
                "role": "OBSERVER",
            }
        )

    async def credits(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "has_credit": True,
                "credits_remaining": None,
                "free_uses_remaining": 0,
                "total_uses": 0,
                "plan_name": None,
                "purchase_required": False,
                "purchase_options": None,
            }
        )

    app = web.Application()
    app.router.add_post("/v1/auth/login", login)
    app.router.add_get("/v1/api/billing/credits", credits)
    server = await aiohttp_server(app)
    code, out, _ = await qa(
        "--url", str(server.make_url("")), "--username", "u", "--password", "p", "--no-purchase"
    )
    assert code == 1
    steps = results(out)
    assert steps["Get Credit Status"] == "FAIL"
    assert "credits_remaining is null, not int" in out
    assert steps["Get Transaction History"] == "FAIL"  # 404: newer clients call it
    assert "QA FAILED" in out


async def test_unreachable_url_and_bad_login_are_one_line_errors(tmp_path: Path) -> None:
    code, out, err = await qa("--url", "http://127.0.0.1:1", "--username", "u", "--password", "p")
    assert code == 2
    assert out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith("ciris-billing-proxy qa: cannot reach")
    with serve(["--user", "ann:pw"], tmp_path) as server:
        code, _, err = await qa("--url", server.url, "--username", "ann", "--password", "wrong")
    assert code == 2
    assert "Invalid credentials" in err
    assert "Traceback" not in err
