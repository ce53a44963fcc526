"""Without a PostgreSQL server the PostgreSQL tests skip and say why; CI's switch makes that a failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .serving import clean_env

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = "postgresql://postgres@127.0.0.1:1/test"


@pytest.mark.parametrize(("required", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_no_server_skips_with_a_reason_unless_required(required: str, outcome: str) -> None:
    env = clean_env(CIRIS_TEST_POSTGRES_URL=NOWHERE, CIRIS_REQUIRE_POSTGRES=required)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "tests/test_store_schema.py::test_five_ledgers_opening_a_new_database_at_once_create_it_once",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert outcome in result.stdout, result.stdout
    assert "no server at postgresql://postgres@127.0.0.1:1/test (ConnectionRefusedError)" in result.stdout
