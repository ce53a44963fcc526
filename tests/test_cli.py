"""`ciris-billing-proxy serve`, run as a real process over real HTTP."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .default_paths import CREDITS, INITIATE, LOGIN, STATUS
from .serving import COMMAND, clean_env, login, serve

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


async def test_demo_first_start_restart_keeps_usage_and_tokens(tmp_path: Path) -> None:
    with serve([], tmp_path) as server:
        banner = "".join(server.output)
        created = re.search(r"Created demo user demo with password (\S+)\n", banner)
        assert created, banner
        assert "Credit provider: simple" in banner
        async with aiohttp.ClientSession() as session:
            token = await login(session, server.url, "demo", created.group(1))
            auth = {"Authorization": f"Bearer {token}"}
            for _ in range(2):
                async with session.post(
                    f"{server.url}/v1/agent/interact", json={"message": "hi"}, headers=auth
                ) as r:
                    assert r.status == 200
                    reply = await r.json()
            assert reply["reply"] == "You said: hi"
            assert reply["free_uses_remaining"] == 8
            async with session.post(f"{server.url}{INITIATE}", json={}, headers=auth) as r:
                assert r.status == 403
                assert (await r.json())["detail"] == "Billing not enabled for this agent"
    assert server.process.returncode == 0
    assert created.group(1) not in (tmp_path / "demo-users.json").read_text()

    with serve([], tmp_path) as server:
        assert "Created demo user" not in "".join(server.output)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}{CREDITS}", headers=auth) as r:
                assert r.status == 200, "a token issued before the restart must stay valid"
                body = await r.json()
            assert (body["free_uses_remaining"], body["total_uses"]) == (8, 2)
            await login(session, server.url, "demo", created.group(1))


async def test_users_from_the_command_line(tmp_path: Path) -> None:
    with serve(["--user", "ann:pw-ann:ann@example.com", "--user", "bob:pw-bob"], tmp_path) as server:
        assert "Created demo user" not in "".join(server.output)
        async with aiohttp.ClientSession() as session:
            await login(session, server.url, "ann", "pw-ann")
            await login(session, server.url, "bob", "pw-bob")
            async with session.post(f"{server.url}{LOGIN}", json={"username": "demo", "password": "x"}) as r:
                assert r.status == 401


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([], {"CIRIS_SIMPLE_FREE_USES": "2"}),
        (["--provider-option", "free_uses=2"], {"CIRIS_SIMPLE_FREE_USES": "7"}),  # the option wins
    ],
    ids=["environment", "provider option"],
)
async def test_free_uses_from_the_environment_or_an_option(
    tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    with serve(["--user", "ann:pw", *args], tmp_path, clean_env(**env)) as server:
        async with aiohttp.ClientSession() as session:
            auth = {"Authorization": f"Bearer {await login(session, server.url, 'ann', 'pw')}"}
            statuses = []
            for _ in range(3):
                async with session.post(
                    f"{server.url}/v1/agent/interact", json={"message": "x"}, headers=auth
                ) as r:
                    statuses.append(r.status)
                    body = await r.json()
            assert statuses == [200, 200, 402]
            assert body["detail"]["error"] == "insufficient_credit"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["serve", "--port", "abc"], "not a port number"),
        (["serve", "--port", "70000"], "port must be 0-65535"),
        (["serve", "--user", "nopassword"], "NAME:PASSWORD[:EMAIL[:ROLE]]"),
        (["serve", "--provider", "nope"], "Installed providers: "),
        (["serve", "--bogus"], "unrecognized arguments"),
        (["serve", "--provider-option", "cbk_secret"], "expected KEY=VALUE"),
        (["serve", "--provider-option", "free_uses=-1"], "simple provider: Invalid configuration: free_uses"),
        (["serve", "--provider-option", "colour=blue"], "simple provider: Invalid configuration: colour"),
        ([], "required"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(tmp_path: Path, args: list[str], words: str) -> None:
    if args[:1] == ["serve"]:
        args = [*args, "--data-dir", str(tmp_path)]
    result = subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert "cbk_secret" not in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ciris_billing_proxy",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_first_start_does_not_lose_the_generated_password(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ciris_billing_proxy",
            "serve",
            "--provider",
            "nope",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert not (tmp_path / "demo-users.json").exists()


@pytest.mark.parametrize("problem", ["data dir is a file", "public key file missing"])
def test_filesystem_problems_are_clear_errors(tmp_path: Path, problem: str) -> None:
    env = clean_env()
    data_dir = tmp_path / "data"
    if problem == "data dir is a file":
        data_dir.write_text("not a directory")
    else:
        env.update(CIRIS_JWT_PUBLIC_KEY=str(tmp_path / "missing.pem"), CIRIS_JWT_ALGORITHMS="RS256")
    result = subprocess.run(
        [*COMMAND, "serve", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("ciris-billing-proxy: ")


async def paid_flow(url: str, username: str, password: str, confirm: Any) -> None:
    async with aiohttp.ClientSession() as session:
        auth = {"Authorization": f"Bearer {await login(session, url, username, password)}"}
        while True:
            async with session.post(f"{url}/v1/agent/interact", json={"message": "x"}, headers=auth) as r:
                if r.status == 402:
                    break
                assert r.status == 200
        async with session.get(f"{url}{CREDITS}", headers=auth) as r:
            credits = await r.json()
        assert credits["purchase_required"] is True
        assert credits["purchase_options"] == {"price_minor": 500, "uses": 20, "currency": "USD"}
        async with session.post(f"{url}{INITIATE}", json={}, headers=auth) as r:
            assert r.status == 200
            payment_id = (await r.json())["payment_id"]
        await confirm(session, payment_id)
        async with session.get(f"{url}{STATUS}{payment_id}", headers=auth) as r:
            assert await r.json() == {"status": "succeeded", "credits_added": 20, "balance_after": 20}
        async with session.get(f"{url}{CREDITS}", headers=auth) as r:
            assert (await r.json())["credits_remaining"] == 20


async def test_serve_fake_backend_runs_the_whole_paid_flow(tmp_path: Path) -> None:
    with serve(["--fake-backend"], tmp_path) as server:
        banner = "".join(server.output)
        fake_url = re.search(r"Fake CIRIS Billing backend on (http://127\.0\.0\.1:\d+)", banner)
        password = re.search(r"with password (\S+)\n", banner)
        assert fake_url, banner
        assert password, banner
        assert "Credit provider: ciris" in banner

        async def confirm(session: aiohttp.ClientSession, payment_id: str) -> None:
            async with session.post(f"{fake_url.group(1)}/_fake/payments/{payment_id}/confirm") as r:
                assert r.status == 200
                assert "_secret_" not in await r.text()

        await paid_flow(server.url, "demo", password.group(1), confirm)


async def test_serve_provider_ciris_reads_the_environment(tmp_path: Path) -> None:
    from ciris_billing_proxy.testing import FakeBillingBackend

    with FakeBillingBackend().run_in_thread() as fake:
        env = clean_env(CIRIS_BILLING_API_URL=fake.url, CIRIS_BILLING_API_KEY=fake.api_key)
        with serve(["--provider", "ciris", "--user", "ann:pw:ann@example.com"], tmp_path, env) as server:
            assert fake.url not in "".join(server.output)

            async def confirm(session: aiohttp.ClientSession, payment_id: str) -> None:
                fake.confirm_payment(payment_id)

            await paid_flow(server.url, "ann", "pw", confirm)
        assert fake.api_key not in "".join(server.output)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({}, "CIRIS_BILLING_API_KEY is required"),
        ({"CIRIS_BILLING_API_KEY": "sk_live_wrong"}, "starts with cbk_"),
        (
            {"CIRIS_BILLING_API_KEY": "cbk_test_x", "CIRIS_BILLING_API_URL": "http://billing.example.com"},
            "must use https",
        ),
    ],
)
def test_ciris_misconfiguration_fails_at_startup(tmp_path: Path, env: dict[str, str], words: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ciris_billing_proxy",
            "serve",
            "--provider",
            "ciris",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=60,
    )
    assert result.returncode == 2
    assert words in result.stderr
    assert "sk_live_wrong" not in result.stderr


def test_the_command_loads_the_testing_kit_only_for_the_fake_backend() -> None:
    # The kit is for tests and `serve --fake-backend`; an agent running the command must not import it.
    probe = (
        "import sys, ciris_billing_proxy.tools.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('ciris_billing_proxy.testing')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
