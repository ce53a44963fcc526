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

from .default_paths import CREDITS, GOOGLE_PLAY, INITIATE, LOGIN, STATUS, TRANSACTIONS
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
        "Verify Store Purchase": "SKIP",
        "Get Tool Balances": "PASS",
    }
    assert "web_search (10 uses left)" in out
    assert "billing not enabled" in out
    assert "app store purchases not enabled for this agent" in out
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
        assert [s["result"] for s in report["steps"]] == ["PASS"] * 8
        assert report["steps"][-2]["reason"].startswith("a made-up purchase is refused with success: false")
        assert report["steps"][-1]["reason"] == "web_search (10 uses left)"
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
    app.router.add_post(LOGIN, login)
    app.router.add_get(CREDITS, credits)
    server = await aiohttp_server(app)
    code, out, _ = await qa(
        "--url", str(server.make_url("")), "--username", "u", "--password", "p", "--no-purchase"
    )
    assert code == 1
    steps = results(out)
    assert steps["Get Credit Status"] == "FAIL"
    assert "credits_remaining is null, not int" in out
    assert steps["Get Transaction History"] == "FAIL"  # 404: newer clients call it
    assert steps["Verify Store Purchase"] == "SKIP"  # 404: an agent from before the mobile routes
    assert steps["Get Tool Balances"] == "SKIP"  # 404: an agent without tool credits
    assert "QA FAILED" in out


async def test_unreachable_url_and_bad_login_are_one_line_errors(tmp_path: Path) -> None:
    code, out, err = await qa("--url", "http://127.0.0.1:1", "--username", "u", "--password", "p")
    assert code == 2
    assert out == ""
    errors = [line for line in err.splitlines() if not line.startswith("... ")]  # all but progress
    assert len(errors) == 1
    assert errors[0].startswith("ciris-billing-proxy qa: cannot reach")
    with serve(["--user", "ann:pw"], tmp_path) as server:
        code, _, err = await qa("--url", server.url, "--username", "ann", "--password", "wrong")
    assert code == 2
    assert "Invalid credentials" in err
    assert "Traceback" not in err


LOGIN_OK = {"access_token": "t", "token_type": "Bearer", "expires_in": 60, "user_id": "u", "role": "OBSERVER"}
GOOD_CREDITS = {
    "has_credit": True,
    "credits_remaining": 0,
    "free_uses_remaining": 3,
    "total_uses": 0,
    "plan_name": "free",
    "purchase_required": False,
    "purchase_options": None,
}
GOOD_TX = {"transactions": [], "total_count": 0, "has_more": False}
REFUSED = {"success": False, "credits_added": 0, "new_balance": 0, "already_processed": False, "error": "No"}
GOOD_TOOLS = {
    "balances": [
        {
            "product_type": "web_search",
            "free_remaining": 3,
            "paid_credits": 2,
            "total_available": 5,
            "price_minor": 1,
            "total_uses": 7,
        }
    ]
}
BAD_TOOL_NAME: dict[str, Any] = {}
TX = {
    "transaction_id": "t",
    "type": "credit",
    "amount_minor": 1,
    "currency": "USD",
    "description": "",
    "created_at": "x",
    "balance_after": 0,
}
GOOD_INITIATE = {
    "payment_id": "pi_1",
    "client_secret": "pi_1_secret_x",
    "amount_minor": 500,
    "currency": "USD",
    "uses_purchased": 20,
    "publishable_key": "pk_1",
}


def agent(**routes: Any) -> web.Application:
    paths = {
        "login": LOGIN,
        "credits": CREDITS,
        "initiate": INITIATE,
        "status": f"{STATUS}pi_1",
        "transactions": TRANSACTIONS,
        "verify": GOOGLE_PLAY,
        "tools": "/v1/api/tools/balance",
        "tool": "/v1/api/tools/balance/{name}",
    }
    bodies = {
        "login": LOGIN_OK,
        "credits": GOOD_CREDITS,
        "initiate": GOOD_INITIATE,
        "status": {"status": "processing", "credits_added": 0, "balance_after": 0},
        "transactions": GOOD_TX,
        "verify": REFUSED,
        "tools": GOOD_TOOLS,
        "tool": BAD_TOOL_NAME,
        **routes,
    }

    def handler(body: Any) -> Any:
        async def answer(request: web.Request) -> web.Response:
            if isinstance(body, bytes):
                return web.Response(status=404, body=body, content_type="text/html")
            if body is BAD_TOOL_NAME:
                return web.json_response({"detail": "Invalid tool name"}, status=400)
            return web.Response(
                text=body if isinstance(body, str) else json.dumps(body), content_type="application/json"
            )

        return answer

    app = web.Application()
    for name, path in paths.items():
        app.router.add_route("*", path, handler(bodies[name]))
    return app


async def run_against(aiohttp_server: Any, *args: str, **routes: Any) -> tuple[int, str, str]:
    server = await aiohttp_server(agent(**routes))
    return await qa(
        "--url", str(server.make_url("")).rstrip("/"), "--username", "u", "--password", "p", *args
    )


async def test_a_correct_agent_passes(aiohttp_server: Any) -> None:
    code, out, _ = await run_against(aiohttp_server)
    assert code == 0, out
    assert set(results(out).values()) == {"PASS"}


async def test_options_without_a_required_purchase_are_not_a_failure(aiohttp_server: Any) -> None:
    credits = {**GOOD_CREDITS, "purchase_options": {"price_minor": 0, "uses": 0, "currency": "USD"}}
    code, out, _ = await run_against(aiohttp_server, "--no-purchase", credits=credits)
    assert code == 0, out
    assert "options sent anyway" in out


@pytest.mark.parametrize(
    ("routes", "step", "words"),
    [
        ({"credits": {"data": GOOD_CREDITS}}, "Get Credit Status", '"data" key'),
        ({"transactions": {"data": GOOD_TX}}, "Get Transaction History", '"data" key'),
        ({"credits": {**GOOD_CREDITS, "total_uses": True}}, "Get Credit Status", "total_uses is true"),
        (
            {"credits": {**GOOD_CREDITS, "free_uses_remaining": 3.0}},
            "Get Credit Status",
            "free_uses_remaining is 3.0",
        ),
        ({"credits": {**GOOD_CREDITS, "has_credit": False}}, "Check Credit Balance Display", "3 uses remain"),
        (
            {"credits": {**GOOD_CREDITS, "plan_name": None}},
            "Check Credit Balance Display",
            "plan_name is null",
        ),
        (
            {"status": {"status": "processing", "credits_added": -20, "balance_after": True}},
            "Check Purchase Status",
            "balance_after is true",
        ),
        (
            {"status": {"status": "done", "credits_added": 0, "balance_after": 0}},
            "Check Purchase Status",
            "unknown status",
        ),
        ({"initiate": {**GOOD_INITIATE, "amount_minor": -500}}, "Initiate Purchase", "amount_minor is -500"),
        ({"initiate": {**GOOD_INITIATE, "currency": ""}}, "Initiate Purchase", "3-letter"),
        (
            {"initiate": {**GOOD_INITIATE, "publishable_key": ""}},
            "Initiate Purchase",
            "publishable_key is empty",
        ),
        (
            {
                "transactions": {
                    "transactions": [
                        {
                            "transaction_id": "t",
                            "type": "debit",
                            "amount_minor": 1,
                            "currency": "USD",
                            "description": "",
                            "created_at": "x",
                            "balance_after": 0,
                        }
                    ],
                    "total_count": 1,
                    "has_more": False,
                }
            },
            "Get Transaction History",
            "not charge or credit",
        ),
        (
            {"transactions": {"transactions": [], "total_count": 0, "has_more": True}},
            "Get Transaction History",
            "has_more true",
        ),
        (
            {"transactions": {**GOOD_TX, "transactions": [{**TX, "metadata": "x"}], "total_count": 1}},
            "Get Transaction History",
            "metadata is a string, not dict or null",
        ),
        (
            {"tools": {"balances": [{**GOOD_TOOLS["balances"][0], "total_available": 4}]}},
            "Get Tool Balances",
            "total_available is not free_remaining + paid_credits",
        ),
        ({"tools": {"balances": [{"product_type": "x"}]}}, "Get Tool Balances", "free_remaining is missing"),
        ({"tool": GOOD_TOOLS}, "Get Tool Balances", "breaking the rule was answered 200"),
    ],
)
async def test_contract_breaks_fail_with_a_reason(
    aiohttp_server: Any, routes: dict[str, Any], step: str, words: str
) -> None:
    code, out, _ = await run_against(aiohttp_server, **routes)
    assert code == 1, out
    assert results(out)[step] == "FAIL"
    assert words in out


async def test_a_misplaced_client_secret_is_never_printed(aiohttp_server: Any) -> None:
    initiate = {**GOOD_INITIATE, "client_secret": ["pi_1_secret_LEAKED"]}
    code, out, _ = await run_against(aiohttp_server, initiate=initiate)
    assert code == 1
    assert "LEAKED" not in out
    assert "client_secret is a list, not str" in out


@pytest.mark.parametrize(
    ("routes", "words"),
    [
        ({"login": "[" * 5000}, "login as 'u' failed"),
        ({"login": b"<html>\n<body>\n<h1>404</h1>\n</body>\n</html>"}, "text/html reply of"),
        ({"login": {"data": LOGIN_OK}}, "no top-level access_token"),
    ],
)
async def test_unusable_login_replies_are_one_line_errors(
    aiohttp_server: Any, routes: dict[str, Any], words: str
) -> None:
    code, out, err = await run_against(aiohttp_server, "--json", **routes)
    assert code == 2
    errors = [line for line in err.splitlines() if not line.startswith("... ")]
    assert len(errors) == 1
    assert words in errors[0]
    assert json.loads(out)["passed"] is False


async def test_transactions_of_a_busy_user_are_checked(tmp_path: Path) -> None:
    import aiohttp

    with serve(["--user", "ann:pw:ann@example.com"], tmp_path) as server:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}{LOGIN}", json={"username": "ann", "password": "pw"}) as r:
                auth = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            for _ in range(3):
                async with session.post(
                    f"{server.url}/v1/agent/interact", json={"message": "x"}, headers=auth
                ):
                    pass
        code, out, _ = await qa("--url", server.url, "--username", "ann", "--password", "pw")
    assert code == 0, out
    assert "3 of 3 transactions" in out


async def test_an_agent_that_accepts_a_made_up_purchase_fails(aiohttp_server: Any) -> None:
    accepted = {**REFUSED, "success": True, "credits_added": 99, "error": None}
    code, out, _ = await run_against(aiohttp_server, verify=accepted)
    assert code == 1
    assert results(out)["Verify Store Purchase"] == "FAIL"
    assert "a made-up purchase token was accepted" in out
