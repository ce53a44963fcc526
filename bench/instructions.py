"""CPU work per request as instruction counts: `python -m bench.instructions [N] [--only ...] [--keep DIR]`.

Every server runs under valgrind's callgrind with instrumentation off, started as a user starts it:
  A   a bare aiohttp handler answering the same `/credits` JSON, encoded per request (`bench.bare`,
      `web.run_app` with its defaults)
  A0  the same, the JSON encoded once at startup
  B   `ciris-billing-proxy serve` (its defaults: `simple` provider, SQLite in a fresh data
      directory), an authenticated, cached `GET /v1/api/billing/credits` with a token from its login
  D   the same server's credit-gated `POST /v1/agent/interact`, one use spent per request
  DP  D with `--database-url` on a fresh PostgreSQL database (dropped after), when a server answers
      at 127.0.0.1:5432
For each, 200 warm-up requests, then instrumentation on for N sequential requests on one
keep-alive connection (each sent once the previous reply is in), dumped and switched off.
Instructions per request are repeatable within about 1 % whatever else the machine does.

A and A0 write no access log (`web.run_app`'s default: aiohttp's access logger is silent while
logging is not configured), so B, D and DP run `serve --no-access-log`: the pairs compared do like
work. `A_log`, `B_log` and `D_log` are the same with an access line per request on both sides
(aiohttp's own access logger at INFO for A, `serve`'s default access log for B and D); aiohttp's
logger costs far more per line than `serve`'s, so that pair flatters B and is shown beside, not
instead.

Prints one JSON line: instructions per request per scenario, and the ratios `B_vs_A` (A's count over
B's: 1.0 means B costs what A does, more is cheaper), `B_vs_A0`, `D_vs_A`, `DP_vs_A`,
`B_log_vs_A_log`, `D_log_vs_A_log`.
`--only B,D` measures some of them; `--keep DIR` keeps the dumps for `callgrind_annotate`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import aiohttp

from ciris_billing_proxy.paths import DEFAULT_LOGIN_PATH
from ciris_billing_proxy.tools.demo import INTERACT_PATH

from .common import CREDITS_PATH
from .store import DEFAULT_SERVER, admin

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 200
SCENARIOS = ("A", "A0", "B", "D", "DP", "A_log", "B_log", "D_log")
FREE_USES = "1000000"
USER, PASSWORD = "bench", "bench-" + "p" * 20

Send = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


async def _get_credits(session: aiohttp.ClientSession, base: str) -> None:
    async with session.get(base + CREDITS_PATH) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"GET /credits: HTTP {r.status}")


async def _interact(session: aiohttp.ClientSession, base: str) -> None:
    async with session.post(base + INTERACT_PATH, json={"message": "hello"}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"POST interact: HTTP {r.status}")


async def _run(base: str, send: Send, n: int, token: str | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        for _ in range(n):
            await send(session, base)


async def _login(base: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + DEFAULT_LOGIN_PATH, json={"username": USER, "password": PASSWORD}) as r,
    ):
        if r.status != 200:
            raise RuntimeError(f"login: HTTP {r.status}")
        return str((await r.json())["access_token"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


class Measured:
    """One server under callgrind; `measure` counts the instructions of N requests."""

    def __init__(self, name: str, argv: list[str], out_dir: Path) -> None:
        self.name = name
        self.out_dir = out_dir
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out_dir}/{name}.%p",
                sys.executable,
                *[a.replace("{port}", str(self.port)) for a in argv],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(("READY", "Listening on")):
                break
        else:
            raise RuntimeError(f"{name} did not start under valgrind")
        self.token: str | None = None

    def measure(self, send: Send, n: int) -> float:
        asyncio.run(_run(self.base, send, WARMUP, self.token))
        _control(self.proc.pid, "-i", "on")
        asyncio.run(_run(self.base, send, n, self.token))
        _control(self.proc.pid, "-d")
        _control(self.proc.pid, "-i", "off")
        dump = max(self.out_dir.glob(f"{self.name}.{self.proc.pid}.*"), key=lambda p: p.stat().st_mtime)
        # `totals:`, the sum of the dump's costs: a second dump's `summary:` leaves out part of them
        # (D measured after B on one server read about 30 % low from it).
        match = re.search(r"^totals:\s+(\d+)", dump.read_text(errors="replace"), re.M)
        if match is None:
            raise RuntimeError(f"no totals in {dump.name}")
        dump.rename(dump.with_name(f"{dump.name}.{send.__name__}"))  # kept apart for callgrind_annotate
        return int(match.group(1)) / n

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


@contextmanager
def server(name: str, argv: list[str], out_dir: Path) -> Iterator[Measured]:
    measured = Measured(name, argv, out_dir)
    try:
        yield measured
    finally:
        measured.stop()


def serve_argv(data_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "ciris_billing_proxy",
        "serve",
        "--port",
        "{port}",
        "--data-dir",
        str(data_dir),
        "--user",
        f"{USER}:{PASSWORD}",
        "--provider-option",
        f"free_uses={FREE_USES}",
        *extra,
    ]


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh database on the local server, dropped after; None when no server answers."""
    name = f"ciris_bench_{secrets.token_hex(6)}"
    try:
        asyncio.run(admin(DEFAULT_SERVER, f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no server, no asyncpg: measured without PostgreSQL
        print(f"DP not measured: {type(exc).__name__}", file=sys.stderr)
        yield None
        return
    try:
        yield DEFAULT_SERVER.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(admin(DEFAULT_SERVER, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run(n: int, keep: Path | None, only: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ciris-bench-") as tmp:
        out_dir = keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, scenario, log in (("A", "A", False), ("A0", "A0", False), ("A_log", "A", True)):
            if name in only:
                argv = ["-m", "bench.bare", scenario, "{port}", *(["--access-log"] if log else [])]
                with server(name, argv, out_dir) as bare:
                    results[name] = bare.measure(_get_credits, n)
        for suffix, extra in (("", ("--no-access-log",)), ("_log", ())):
            wanted = [s for s in ("B", "D") if s + suffix in only]
            if not wanted:
                continue
            argv = serve_argv(Path(tmp) / f"sqlite{suffix}", *extra)
            with server("serve" + suffix, argv, out_dir) as serve:
                serve.token = asyncio.run(_login(serve.base))
                for scenario in wanted:
                    send = _get_credits if scenario == "B" else _interact
                    results[scenario + suffix] = serve.measure(send, n)
        with postgres_database() if "DP" in only else nullcontext() as url:
            if url is not None:
                argv = serve_argv(Path(tmp) / "postgres", "--database-url", url, "--no-access-log")
                with server("serve_pg", argv, out_dir) as pg:
                    pg.token = asyncio.run(_login(pg.base))
                    results["DP"] = pg.measure(_interact, n)
    counts: dict[str, Any] = {k: round(v) for k, v in results.items()}
    pairs = (("A", "B"), ("A0", "B"), ("A", "D"), ("A", "DP"), ("A_log", "B_log"), ("A_log", "D_log"))
    for over, under in pairs:
        if over in counts and under in counts:
            counts[f"{under}_vs_{over}"] = round(counts[over] / counts[under], 3)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("n", nargs="?", type=int, default=500, help="requests counted per scenario")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to measure (default all: {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the callgrind dumps here (for callgrind_annotate)"
    )
    args = parser.parse_args()
    if shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed")
    print(json.dumps(run(args.n, args.keep, set(args.only.split(",")))), flush=True)


if __name__ == "__main__":
    main()
