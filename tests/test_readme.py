"""The README stays a true front door: its snippets run, its Quickstart is what CI runs, the paid demo
comes early, and it stays short (reference material lives in docs/)."""

from __future__ import annotations

import pydoc
import re
from pathlib import Path
from typing import Any

import pytest

import ciris_billing_proxy
from ciris_billing_proxy.client import BillingClient
from ciris_billing_proxy.testing import TokenFactory

from .default_paths import CREDITS
from .repo_files import README, ROOT, code_after, doc


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, title
    return match.group(1)


def quickstart_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", section("Quickstart"), re.S)[:2]


async def test_registration_snippet_runs(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = "readme-secret-" + "r" * 40
    monkeypatch.setenv("CIRIS_JWT_SECRET", secret)
    monkeypatch.setenv("CIRIS_BILLING_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CIRIS_SIMPLE_DATABASE", ":memory:")
    namespace: dict[str, Any] = {}
    exec(compile(code_after("register"), "README.md", "exec"), namespace)  # noqa: S102
    client = await aiohttp_client(namespace["app"])
    headers = TokenFactory(namespace["billing"].config).headers("zoe")
    resp = await client.post("/v1/agent/interact", headers=headers)
    assert await resp.json() == {"reply": "Hello zoe"}
    credits = await (await client.get(CREDITS, headers=headers)).json()
    assert credits["free_uses_remaining"] == 9


async def test_integration_snippet_runs(
    aiohttp_client: Any, ciris_billing_config: Any, ciris_fake_backend: Any, ciris_tokens: Any
) -> None:
    from aiohttp import web

    from ciris_billing_proxy import setup_billing

    def create_my_agent(config: Any) -> web.Application:
        app = web.Application()
        setup_billing(app, config, environ={})
        return app

    namespace: dict[str, Any] = {"create_my_agent": create_my_agent}
    exec(compile(code_after("integration"), "README.md", "exec"), namespace)  # noqa: S102
    await namespace["test_user_can_buy_credits"](
        aiohttp_client, ciris_billing_config, ciris_fake_backend, ciris_tokens
    )
    assert ciris_fake_backend.calls["purchases"] == 1


def test_the_readme_is_a_front_door() -> None:
    # A newcomer reaches the offline paid demo within the first 60 lines, in a code block.
    first = "\n".join(README.splitlines()[:60])
    assert re.search(r"```bash\n[^`]*ciris-billing-proxy serve --fake-backend\n```", first)
    assert len(README.splitlines()) <= 300
    # The Python versions it states are the ones the package declares.
    declared = re.search(r'requires-python = ">=(3\.\d+)"', (ROOT / "pyproject.toml").read_text())
    assert declared
    assert f"Python {declared.group(1)} or newer" in README
    assert "python3.11" not in README


def test_quickstart_is_two_commands_and_ci_runs_the_test_command() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert commands[0].endswith("ciris-billing-proxy serve")
    test_command = commands[1]
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for part in test_command.split(" && "):
        assert part in ci, part


def test_the_performance_page_embeds_the_latest_benchmark_table() -> None:
    results = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    embedded = doc("performance.md").split("<!-- bench:start -->\n", 1)[1].split("<!-- bench:end -->", 1)[0]
    assert embedded == results
    assert "| A: bare aiohttp handler" in embedded


def test_the_front_door_objects_explain_themselves_in_help() -> None:
    for thing in (
        ciris_billing_proxy.setup_billing,
        ciris_billing_proxy.credit_gate,
        ciris_billing_proxy.get_identity,
        ciris_billing_proxy.BillingService,
        BillingClient,
    ):
        words = (thing.__doc__ or "").split()
        assert len(words) >= 15, thing
        assert " ".join(words[:5]) in " ".join(pydoc.render_doc(thing, renderer=pydoc.plaintext).split())
