"""`python -m bench` runs end to end (a short run: this checks it works, never how fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_and_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--rounds",
            "1",
            "--duration",
            "0.3",
            "--identities",
            "2000",
            "--out",
            str(out),
            "--no-embed",
            "--no-instructions",
            "--changes",
            "20",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    table = out.read_text()
    for scenario in ("| A:", "| A0:", "| B:", "| C:", "| D:"):
        assert scenario in table
    assert "caused 100 backend calls" in table  # single-flight: one call per user in the burst
    assert "| 0 |" in table  # no request failed
    assert "Two server processes sharing PostgreSQL" in table or "on PostgreSQL not measured" in table
