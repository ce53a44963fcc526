"""Two server processes sharing PostgreSQL: `python -m bench.shared [--changes N] [--database-url URL]`.

* Gated spends: the demo's gated endpoint on two DP servers (ledger and change feed in one
  PostgreSQL database), loaded at once, against one D server (SQLite), interleaved rounds; requests
  per server CPU-second (both DP servers' CPU summed), PostgreSQL's own CPU not counted.
* Freshness: a spend on server A, then server B's `/credits` for that user (cached on B) asked back
  to back until it shows the spend: the delay from A's reply to B's first fresh reply, over N changes.

Prints one JSON line. The database is created for the run and dropped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from yarl import URL

from ciris_billing_proxy.tools.demo import INTERACT_PATH

from .__main__ import measure, process
from .common import CREDITS_PATH, token
from .load import percentile
from .store import DEFAULT_SERVER, admin


def gated(
    args: argparse.Namespace, d_port: str, d_pid: int, servers: list[tuple[int, str]]
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": "closed",
        "duration": args.duration,
        "concurrency": args.concurrency // 2,
        "users": [f"user-{i}" for i in range(100)],
        "method": "POST",
        "body": {"message": "hi"},
        "warmup": 100,
    }
    d_rates, dp_rates = [], []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(args.rounds):
            d = measure(d_pid, {**spec, "concurrency": args.concurrency, "url": d_url(d_port)})
            both = list(pool.map(lambda s: measure(s[0], {**spec, "url": d_url(s[1])}), servers))
            if d["errors"] or any(r["errors"] for r in both):
                raise SystemExit("gated requests failed")
            d_rates.append(d["per_cpu_s"])
            dp_rates.append(sum(r["requests"] for r in both) / sum(r["cpu_s"] for r in both))
    d_median, dp_median = statistics.median(d_rates), statistics.median(dp_rates)
    return {"d_per_cpu_s": d_median, "dp2_per_cpu_s": dp_median, "ratio": dp_median / d_median}


def d_url(port: str) -> str:
    return f"http://127.0.0.1:{port}{INTERACT_PATH}"


async def freshness(a_port: str, b_port: str, changes: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token('freshness')}"}
    credits = f"http://127.0.0.1:{b_port}{CREDITS_PATH}"
    delays: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def used_on_b() -> int:
            async with session.get(credits, headers=headers) as reply:
                used: int = (await reply.json())["total_uses"]
                return used

        used = await used_on_b()
        for _ in range(changes):
            async with session.post(d_url(a_port), json={"message": "hi"}, headers=headers) as reply:
                assert reply.status == 200
            changed = time.perf_counter()
            used += 1
            while await used_on_b() != used:
                if time.perf_counter() - changed > 15:
                    raise SystemExit("a change was not seen on B")
            delays.append((time.perf_counter() - changed) * 1000)
    delays.sort()
    return {
        "changes": changes,
        "fresh_p50_ms": percentile(delays, 0.5),
        "fresh_p99_ms": percentile(delays, 0.99),
        "fresh_max_ms": delays[-1],
    }


def run(args: argparse.Namespace, database_url: str) -> dict[str, Any]:
    with (
        process("servers", "D") as (sqlite, (sqlite_port,)),
        process("servers", "DP", database_url) as (a, (a_port,)),
        process("servers", "DP", database_url) as (b, (b_port,)),
    ):
        result = gated(args, sqlite_port, sqlite.pid, [(a.pid, a_port), (b.pid, b_port)])
        result.update(asyncio.run(freshness(a_port, b_port, args.changes)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shared", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--database-url", default=DEFAULT_SERVER, help="a server to create the database on")
    args = parser.parse_args()
    name = f"ciris_bench_{secrets.token_hex(4)}"
    asyncio.run(admin(args.database_url, f'CREATE DATABASE "{name}"'))
    try:
        result = run(args, str(URL(args.database_url).with_path(f"/{name}")))
    finally:
        asyncio.run(admin(args.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
