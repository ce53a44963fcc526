"""CPU work per request as instruction counts: `python -m bench.instructions [N]`.

Each of A, A0 and B runs under valgrind's callgrind with instrumentation off; after a warm-up it is
switched on for N sequential requests (one at a time, so no batching effects), dumped, and switched
off. Instructions per request are repeatable whatever else the machine does, unlike CPU seconds.
Prints one JSON line {scenario: instructions per request}; needs valgrind (callgrind_control).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from .common import CREDITS_PATH, token

SCENARIOS = ("A", "A0", "B")
ROOT = Path(__file__).resolve().parent.parent


async def requests(port: int, n: int) -> None:
    headers = {"Authorization": f"Bearer {token('user-0')}"}
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(f"http://127.0.0.1:{port}{CREDITS_PATH}", headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def measure(scenario: str, n: int, out_dir: Path) -> float:
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_dir}/{scenario}.%p",
            sys.executable,
            "-m",
            "bench.servers",
            scenario,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"{scenario} did not start under valgrind")
        port = int(line[1])
        asyncio.run(requests(port, 50))  # warm-up: imports, caches, connections
        control(proc.pid, "-i", "on")
        asyncio.run(requests(port, n))
        control(proc.pid, "-d")
        control(proc.pid, "-i", "off")
    finally:
        proc.terminate()
        proc.wait(60)
    dump = max(out_dir.glob(f"{scenario}.{proc.pid}.*"), key=lambda p: p.stat().st_mtime)
    match = re.search(r"^summary:\s+(\d+)", dump.read_text(errors="replace"), re.M)
    if match is None:
        raise RuntimeError(f"no summary in {dump.name}")
    return int(match.group(1)) / n


def main(n: int) -> dict[str, float]:
    if shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        return {scenario: measure(scenario, n, Path(tmp)) for scenario in SCENARIOS}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)), flush=True)
