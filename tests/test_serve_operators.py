"""`serve` for operators: every flag from an environment variable (flags win), users from a file or
the environment so no password shows in `ps`, and a provider that cannot start is one line, exit 2."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest

from ciris_billing_proxy.tools.cli import build_parser, main, serve_env_var, serve_flags

from .conftest import SECRET
from .default_paths import LOGIN
from .repo_files import ROOT
from .serving import COMMAND, clean_env, serve


def serve_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = build_parser(environ)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve_cmd: argparse.ArgumentParser = commands.choices["serve"]
    return serve_cmd


def running_section() -> str:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    match = re.search(r"^## Running `serve`\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match
    return match.group(1)


def test_every_serve_flag_has_a_variable_named_after_it_documented_and_in_its_help() -> None:
    parser = serve_parser({})
    flags = serve_flags(parser)
    assert {"--host", "--port", "--workers", "--idle-timeout", "--users-file"} <= {
        o for a in flags for o in a.option_strings
    }
    documented = running_section()
    for action in flags:
        var = serve_env_var(action)
        name = action.option_strings[0].removeprefix("--").upper().replace("-", "_")
        assert var.startswith(f"CIRIS_BILLING_{name}"), var
        assert f"| `{var}`" in documented, f"{var} is not in docs/operations.md"
        assert action.help is not None
        assert action.help.endswith(f"env {var}"), action.help
    assert serve_env_var(next(a for a in flags if "--user" in a.option_strings)) == "CIRIS_BILLING_USERS"


def test_variables_are_the_defaults_and_flags_win() -> None:
    environ = {
        "CIRIS_BILLING_HOST": "::1",
        "CIRIS_BILLING_PORT": "8123",
        "CIRIS_BILLING_WORKERS": "3",
        "CIRIS_BILLING_IDLE_TIMEOUT": "12.5",
        "CIRIS_BILLING_USERS": "ann:pw-a\n\nbob:pw-b:bob@example.com\n",
        "CIRIS_BILLING_PROVIDER_OPTIONS": "free_uses=7\ndatabase=:memory:",
        "CIRIS_BILLING_FAKE_BACKEND": "yes",
        "CIRIS_BILLING_USERS_FILE": "/etc/agent/users",
        "CIRIS_BILLING_PROVIDER": "ciris",
    }
    parser = build_parser(environ)
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.workers, args.idle_timeout) == ("::1", 8123, 3, 12.5)
    assert args.user == [("ann", "pw-a", None, None), ("bob", "pw-b", "bob@example.com", None)]
    assert args.provider_option == [("free_uses", "7"), ("database", ":memory:")]
    assert (args.fake_backend, args.users_file, args.provider) == (True, Path("/etc/agent/users"), "ciris")
    given = parser.parse_args(
        [
            "serve",
            "--port",
            "9000",
            "--workers",
            "1",
            "--user",
            "cat:pw-c",
            "--provider-option",
            "free_uses=1",
        ]
    )
    assert (given.port, given.workers, given.host) == (9000, 1, "::1")
    assert given.user == [("cat", "pw-c", None, None)]
    assert given.provider_option == [("free_uses", "1")]
    assert build_parser({}).parse_args(["serve"]).port == 8000


@pytest.mark.parametrize(
    ("var", "raw", "message"),
    [
        ("CIRIS_BILLING_PORT", "eighty", "CIRIS_BILLING_PORT: not a port number: 'eighty'"),
        ("CIRIS_BILLING_WORKERS", "0", "CIRIS_BILLING_WORKERS: must be a whole number from 1 to 64"),
        (
            "CIRIS_BILLING_FAKE_BACKEND",
            "maybe",
            "CIRIS_BILLING_FAKE_BACKEND: expected 1/true/yes/on or 0/false/no/off",
        ),
        (
            "CIRIS_BILLING_USERS",
            "ann-without-password-hunter2",
            "CIRIS_BILLING_USERS: expected NAME:PASSWORD[:EMAIL[:ROLE]]",
        ),
    ],
)
def test_a_bad_variable_is_one_line_naming_it_and_exit_2(
    var: str, raw: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(var, raw)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ciris-billing-proxy serve: error: {message}")
    assert err.count("\n") == 1
    assert "hunter2" not in err
    # Other commands do not read serve's variables.
    assert main(["openapi"]) == 0


def test_a_bad_line_of_the_users_file_is_named_by_number_never_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users.txt"
    users.write_text("# the agent's users\nann:pw-a\n\nbob-secret-password-no-colon\n", encoding="utf-8")
    assert main(["serve", "--data-dir", str(tmp_path), "--users-file", str(users)]) == 2
    err = capsys.readouterr().err
    assert err == f"ciris-billing-proxy: {users}, line 4: expected NAME:PASSWORD[:EMAIL[:ROLE]]\n"
    assert main(["serve", "--data-dir", str(tmp_path), "--users-file", str(tmp_path / "missing")]) == 2
    assert "No such file or directory" in capsys.readouterr().err


async def test_users_from_a_file_and_the_environment_log_in_and_no_password_shows_in_ps(
    tmp_path: Path,
) -> None:
    users = tmp_path / "users.txt"
    users.write_text("ann:file-password-ann\nbob:file-password-bob:bob@example.com\n", encoding="utf-8")
    env = clean_env(CIRIS_JWT_SECRET=SECRET, CIRIS_BILLING_USERS="cat:env-password-cat")
    with serve(["--users-file", str(users)], tmp_path / "data", env) as server:
        assert "password" not in command_line(server.process.pid)
        async with aiohttp.ClientSession() as session:
            for name, password in (
                ("ann", "file-password-ann"),
                ("bob", "file-password-bob"),
                ("cat", "env-password-cat"),
            ):
                async with session.post(
                    f"{server.url}{LOGIN}", json={"username": name, "password": password}
                ) as r:
                    assert r.status == 200, (name, await r.text())
            async with session.post(f"{server.url}{LOGIN}", json={"username": "demo", "password": "x"}) as r:
                assert r.status == 401
    assert "Created demo user" not in "".join(server.output)
    assert "password" not in "".join(server.output)


def command_line(pid: int) -> str:
    """What `ps` shows of a process's arguments."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_provider_that_cannot_start_is_one_line_naming_it_and_exit_2(tmp_path: Path, workers: str) -> None:
    # A records file that is not a database: the ciris provider's start() fails opening it. Before,
    # a 61-line traceback and exit 1.
    garbage = tmp_path / "records.sqlite3"
    garbage.write_bytes(b"not a database " * 400)
    options = [
        f"database={garbage}",
        "api_url=http://127.0.0.1:9",
        "api_key=cbk_test_" + "k" * 43,
    ]
    args = ["serve", "--port", "0", "--data-dir", str(tmp_path), "--provider", "ciris", "--workers", workers]
    for option in options:
        args += ["--provider-option", option]
    result = subprocess.run(
        [*COMMAND, *args, "--user", "ann:pw"],
        capture_output=True,
        text=True,
        env=clean_env(CIRIS_JWT_SECRET=SECRET),
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr
        == "ciris-billing-proxy: credit provider 'ciris' could not start: DatabaseError in start()\n"
    )
    assert "k" * 43 not in result.stdout + result.stderr
