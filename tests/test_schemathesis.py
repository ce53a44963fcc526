"""Schemathesis against the running demo, `serve` (simple) and `serve --fake-backend`, as real
subprocesses, logged in through the demo login, with all of its checks: zero failures.

`tests/schemathesis.toml` holds the check configuration. Login lockouts and the limit of new tokens
are off in these servers (limits 0): schemathesis sends hundreds of failed logins, with user names
it has read in replies, which would lock out the run's own user. The 429 they would give is documented and
produced in tests/test_openapi.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ciris_billing_proxy.openapi import openapi_document
from ciris_billing_proxy.paths import DEFAULT_LOGIN_PATH, DEFAULT_PREFIX

from .repo_files import ROOT
from .serving import clean_env, serve

USER, PASSWORD = "demo", "demo-password-123"
#: Test cases per operation and phase: enough to find the classic failures, bounded for 2 cores.
MAX_EXAMPLES = "10"


@pytest.mark.parametrize("args", [[], ["--fake-backend"]], ids=["simple", "fake-backend"])
def test_schemathesis_finds_nothing(tmp_path: Path, args: list[str]) -> None:
    # No limit of new tokens either: the run logs in again after each of its own logouts, once per
    # operation it then tries, and refreshes hundreds of times (the 429 is test_openapi.py's too).
    env = clean_env(
        CIRIS_LOGIN_MAX_FAILURES_PER_USER="0",
        CIRIS_LOGIN_MAX_FAILURES_PER_ADDRESS="0",
        CIRIS_TOKEN_ISSUE_MAX_PER_USER="0",
    )
    # The email address lets the ciris provider start purchases.
    user = ["--user", f"{USER}:{PASSWORD}:{USER}@example.com"]
    with serve([*args, *user], tmp_path / "data", env) as server:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(ROOT / "tests" / "schemathesis.toml"),
                "run",
                f"{server.url}{DEFAULT_PREFIX}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                MAX_EXAMPLES,
                "--workers",
                "1",
                "--generation-database",
                "none",
                "--no-color",
            ],
            cwd=tmp_path,
            env={
                **env,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
                "BILLING_DEMO_URL": server.url,
                "BILLING_DEMO_USER": USER,
                "BILLING_DEMO_PASSWORD": PASSWORD,
            },
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert run.returncode == 0, run.stdout + run.stderr  # 1 for any failure or error
    paths = openapi_document(DEFAULT_PREFIX, DEFAULT_LOGIN_PATH)["paths"]
    operations = sum(len(item) for item in paths.values())
    # Every operation of the demo but the one that serves the document, which schemathesis leaves out.
    assert f"Tested: {operations - 1}" in run.stdout
