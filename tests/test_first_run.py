"""What a new user meets first: the version, the demo password, restarts, an unset JWT secret."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import ciris_billing_proxy
from ciris_billing_proxy import BillingConfig, ConfigError
from ciris_billing_proxy.tools.demo import generate_password

from .repo_files import code_after
from .serving import COMMAND, clean_env, login, serve

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def test_version_option_prints_the_package_version() -> None:
    result = subprocess.run(
        [*COMMAND, "--version"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ciris-billing-proxy {PYPROJECT_VERSION}\n"
    assert ciris_billing_proxy.__version__ == PYPROJECT_VERSION


def test_generated_passwords_are_safe_on_a_command_line() -> None:
    passwords = [generate_password() for _ in range(10_000)]
    assert not [p for p in passwords if p.startswith("-")]
    assert all(p.isalnum() and p.isascii() and len(p) == 16 for p in passwords)
    assert len(set(passwords)) == len(passwords)


async def test_first_start_prints_the_password_bare_and_a_restart_says_who_exists(tmp_path: Path) -> None:
    with serve([], tmp_path) as server:
        line = next(line for line in server.output if line.startswith("Created demo user"))
        assert "'" not in line
        assert '"' not in line
        created = re.fullmatch(r"Created demo user demo with password ([A-Za-z0-9]{16})\n", line)
        assert created, line
        async with aiohttp.ClientSession() as session:
            await login(session, server.url, "demo", created.group(1))

    with serve([], tmp_path) as server:
        banner = "".join(server.output)
        assert "Created demo user" not in banner
        assert "Demo users: demo (created earlier; password not shown again)" in banner
        assert f"delete {tmp_path / 'demo-users.json'} and start again" in banner
        assert "serve --user NAME:PASSWORD" in banner
        assert created.group(1) not in banner

    with serve(["--user", "ann:pw"], tmp_path) as server:
        assert "Demo users:" not in "".join(server.output)  # this run's logins were given


@pytest.mark.parametrize(
    "env",
    [{}, {"CIRIS_JWT_SECRET": ""}, {"CIRIS_JWT_ALGORITHMS": "RS256"}],
    ids=["unset", "empty", "public-key algorithm"],
)
def test_an_unset_jwt_key_says_it_is_unset_and_how_to_set_it(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        BillingConfig.from_env(env)
    message = str(info.value)
    assert message.startswith("CIRIS_JWT_SECRET is not set: set it to a random string of at least 32 bytes")
    assert "python -c 'import secrets; print(secrets.token_urlsafe(48))'" in message
    assert "CIRIS_JWT_PUBLIC_KEY" in message


def test_a_short_jwt_secret_keeps_its_message() -> None:
    with pytest.raises(ConfigError, match="the JWT secret must be at least 32 bytes for HS256") as info:
        BillingConfig.from_env({"CIRIS_JWT_SECRET": "tooshort"})
    assert "not set" not in str(info.value)


def test_the_readme_snippet_without_a_secret_says_it_is_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CIRIS_JWT_SECRET", raising=False)
    monkeypatch.delenv("CIRIS_JWT_PUBLIC_KEY", raising=False)
    monkeypatch.setenv("CIRIS_BILLING_DATA_DIR", str(tmp_path))
    namespace: dict[str, Any] = {}
    with pytest.raises(ConfigError, match="CIRIS_JWT_SECRET is not set"):
        exec(compile(code_after("register"), "README.md", "exec"), namespace)  # noqa: S102


def test_serve_without_a_secret_still_generates_one(tmp_path: Path) -> None:
    with serve(["--user", "ann:pw"], tmp_path) as server:
        assert "Listening on" in "".join(server.output)
    assert (tmp_path / "jwt-secret").exists()
