"""The load generator, in its own process on core 1: `python -m bench.load JSON_SPEC`.

Three modes. `closed`: `concurrency` workers send requests back to back for `duration`
seconds, cycling through the tokens. `paced`: the same workers, but together at a fixed `rate`
(req/s), so different servers see the same offered load. `burst`: every request of the spec is
sent at once. Prints one JSON line: requests, errors, elapsed seconds and latency percentiles (ms).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

from .common import pin, token


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(int(q * len(sorted_values)), len(sorted_values) - 1)
    return sorted_values[index]


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    url: str = spec["url"]
    method: str = spec.get("method", "GET")
    body = spec.get("body")
    users: list[str] = spec["users"]
    headers = [{"Authorization": f"Bearer {token(u)}"} for u in users]
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=spec.get("concurrency", 1000), force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(h: dict[str, str]) -> None:
            nonlocal errors
            start = time.perf_counter()
            try:
                async with session.request(method, url, json=body, headers=h) as resp:
                    await resp.read()
                    if resp.status != spec.get("expect", 200):
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - start)

        for h in headers[: spec.get("warmup", 0)]:  # fills caches and opens connections
            await one(h)
        latencies.clear()
        errors = 0
        began = time.perf_counter()
        if spec["mode"] == "burst":
            await asyncio.gather(*(one(h) for h in headers for _ in range(spec["per_user"])))
        else:
            deadline = began + spec["duration"]
            # Paced: each worker sends on its own schedule, `concurrency / rate` seconds apart.
            gap = spec["concurrency"] / spec["rate"] if spec["mode"] == "paced" else 0.0

            async def worker(offset: int) -> None:
                i = offset
                due = began + gap * offset / spec["concurrency"]
                while time.perf_counter() < deadline:
                    if gap:
                        await asyncio.sleep(max(due - time.perf_counter(), 0))
                        due += gap
                    await one(headers[i % len(headers)])
                    i += spec["concurrency"]

            await asyncio.gather(*(worker(i) for i in range(spec["concurrency"])))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "elapsed": elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


if __name__ == "__main__":
    pin(1)
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))), flush=True)
