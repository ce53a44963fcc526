"""Billing event delivery: `python -m bench.events [--events N] [--database-url URL]`.

One process runs an app with billing set up (the `simple` provider on a SQLite file, or on
PostgreSQL with `--database-url`) delivering signed webhooks to a receiver on loopback (an aiohttp
server in the same process and loop, answering 200 at once), and measures:

* throughput: N events written in one transaction by another connection (as the grants ledger
  writes them), the app started, until the receiver has every one: events per second;
* latency, commit to receipt, for one event at a time: written by another process (the delivery
  sees it at its next look, every second) and written by this one (the change wakes the delivery).

Prints one JSON line. The receiver verifies each signature, so its cost is in the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from ciris_billing_proxy import BillingConfig, JWTConfig, setup_billing
from ciris_billing_proxy.events import verify_signature
from ciris_billing_proxy.store.events import add_postgres, add_sqlite

from .common import SECRET

HOOK_SECRET = "bench-" + "h" * 32


class Receiver:
    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        verify_signature(body, request.headers.get("X-CIRIS-Signature"), HOOK_SECRET)
        self.arrived.setdefault(request.headers["X-CIRIS-Event-Id"], time.perf_counter())
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"


class Writer:
    """Writes events as the ledger does, on a connection of its own."""

    def __init__(self, path: Path | None, database_url: str | None) -> None:
        self.path = path
        self.database_url = database_url
        self.pg: Any = None

    async def open(self) -> None:
        if self.database_url is not None:
            import asyncpg

            self.pg = await asyncpg.connect(self.database_url)

    async def write(self, count: int) -> list[str]:
        if self.pg is not None:
            async with self.pg.transaction():
                return [
                    await add_postgres(self.pg, "credit.granted", "local", f"u{n}", {"n": n})
                    for n in range(count)
                ]
        assert self.path is not None
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            ids = [add_sqlite(conn, "credit.granted", "local", f"u{n}", {"n": n}) for n in range(count)]
            conn.execute("COMMIT")
            return ids
        finally:
            conn.close()

    async def close(self) -> None:
        if self.pg is not None:
            await self.pg.close()


async def until_arrived(receiver: Receiver, ids: list[str], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not all(i in receiver.arrived for i in ids):
        if time.monotonic() > deadline:
            raise SystemExit(f"only {sum(i in receiver.arrived for i in ids)} of {len(ids)} events arrived")
        await asyncio.sleep(0.001)


async def run(events: int, database_url: str | None, samples: int) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-events-"))
    ledger = data_dir / "ledger.sqlite3"
    receiver = Receiver()
    await receiver.start()
    options = {} if database_url else {"database": str(ledger)}
    config = BillingConfig(
        jwt=JWTConfig(secret=SECRET),
        data_dir=data_dir,
        provider_options=options,
        database_url=database_url,
        events_url=receiver.url,
        events_secret=HOOK_SECRET,
    )
    writer = Writer(ledger, database_url)
    await writer.open()
    # The table first (the app's start migrates it), then the burst written while no app runs.
    app = web.Application()
    setup_billing(app, config, environ={})
    runner = web.AppRunner(app)
    await runner.setup()
    await runner.cleanup()
    ids = await writer.write(events)
    app = web.Application()
    service = setup_billing(app, config, environ={})
    runner = web.AppRunner(app)
    started = time.perf_counter()
    await runner.setup()
    await until_arrived(receiver, ids)
    burst = time.perf_counter() - started
    assert service.events is not None
    polled, woken = [], []
    for n in range(samples):
        await asyncio.sleep(0.1)  # one at a time, not a burst (a burst is taken once per 50 ms)
        written = time.perf_counter()
        (event_id,) = await writer.write(1)
        if n % 2:
            service.events.delivery.wake()  # what a change made by this process does
        await until_arrived(receiver, [event_id])
        (woken if n % 2 else polled).append((receiver.arrived[event_id] - written) * 1000)
    await runner.cleanup()
    await writer.close()
    assert receiver.runner is not None
    await receiver.runner.cleanup()
    return {
        "store": "postgresql" if database_url else "sqlite",
        "events": events,
        "burst_seconds": round(burst, 3),
        "events_per_second": round(events / burst),
        "latency_ms_other_process": {
            "p50": round(statistics.median(polled), 1),
            "max": round(max(polled), 1),
        },
        "latency_ms_this_process": {"p50": round(statistics.median(woken), 1), "max": round(max(woken), 1)},
    }


async def with_database(server: str, events: int, samples: int) -> dict[str, Any]:
    import asyncpg
    from yarl import URL

    name = f"bench_events_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        return await run(events, str(URL(server).with_path(f"/{name}")), samples)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=20, help="single events timed (half of them woken)")
    parser.add_argument("--database-url", default=None, help="a PostgreSQL server to make a database on")
    args = parser.parse_args()
    if args.database_url:
        result = asyncio.run(with_database(args.database_url, args.events, args.samples))
    else:
        result = asyncio.run(run(args.events, None, args.samples))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
