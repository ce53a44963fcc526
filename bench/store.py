"""Gated spends on PostgreSQL against SQLite: `python -m bench.store [--rounds N] [--database-url URL]`.

Runs the gated demo endpoint with the `simple` ledger in SQLite (D) and in PostgreSQL (DP), each
server pinned to core 0 and the load generator to core 1, interleaved, and prints requests/s and
requests per server CPU-second with their ratio per round and as medians. The server's CPU is the
agent process's only: PostgreSQL's own work is not counted (on this 2-core machine it competes with
both). The PostgreSQL database is created for the run and dropped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
from typing import Any

from yarl import URL

from .__main__ import measure, process

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


async def admin(server: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def run(args: argparse.Namespace, database_url: str) -> None:
    ratios: list[tuple[float, float]] = []
    spec: dict[str, Any] = {
        "mode": "closed",
        "duration": args.duration,
        "concurrency": args.concurrency,
        "users": [f"user-{i}" for i in range(100)],
        "method": "POST",
        "body": {"message": "hi"},
        "warmup": 100,
    }
    with (
        process("servers", "D") as (sqlite, (sqlite_port,)),
        process("servers", "DP", database_url) as (
            postgres,
            (postgres_port,),
        ),
    ):
        for round_no in range(args.rounds):
            results = {}
            for name, proc, port in (("D", sqlite, sqlite_port), ("DP", postgres, postgres_port)):
                result = measure(proc.pid, {**spec, "url": f"http://127.0.0.1:{port}/v1/agent/interact"})
                if result["errors"]:
                    raise SystemExit(f"{name}: {result['errors']} errors")
                results[name] = result
            rps = results["DP"]["rps"] / results["D"]["rps"]
            per_cpu = results["DP"]["per_cpu_s"] / results["D"]["per_cpu_s"]
            ratios.append((rps, per_cpu))
            print(
                f"round {round_no + 1}: "
                + ", ".join(
                    f"{n} {r['rps']:.0f} req/s, {r['per_cpu_s']:.0f} req/CPU-s, p99 {r['p99_ms']:.1f} ms"
                    for n, r in results.items()
                )
                + f"; DP/D {rps:.2f} req/s, {per_cpu:.2f} req/CPU-s",
                flush=True,
            )
    print(
        f"median DP/D: {statistics.median(r for r, _ in ratios):.2f} req/s, "
        f"{statistics.median(c for _, c in ratios):.2f} req per server CPU-s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--database-url", default=DEFAULT_SERVER, help="a server to create the database on")
    args = parser.parse_args()
    name = f"ciris_bench_{secrets.token_hex(4)}"
    asyncio.run(admin(args.database_url, f'CREATE DATABASE "{name}"'))
    try:
        run(args, str(URL(args.database_url).with_path(f"/{name}")))
    finally:
        asyncio.run(admin(args.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
