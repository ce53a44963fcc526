"""`python -m bench.stripe_webhooks [DATABASE_URL]`: the `stripe` provider's purchase path, one request at
a time over loopback: `purchase/initiate` through the official library to the fake Stripe API, then
each purchase's signed `payment_intent.succeeded` webhook (credited), then the same again (a
duplicate, answered from the event record). SQLite in a temporary directory by default; a
`postgresql://` URL uses that database (its tables are left behind: give it a fresh one).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ciris_billing_proxy import BillingConfig, JWTConfig, setup_billing
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.testing.fake_stripe_api import FakeStripeAPI, signature

PURCHASES = 200
PREFIX = "/v1/api/billing"


async def run(database_url: str | None, data_dir: Path) -> str:
    fake = FakeStripeAPI()
    await fake.start()
    options: dict[str, Any] = {
        "secret_key": fake.secret_key,
        "publishable_key": fake.publishable_key,
        "webhook_secret": fake.webhook_secret,
        "api_base": fake.url,
        "max_retries": 0,
        "purchase_max_per_user": 0,
    }
    extra: dict[str, Any] = {"database_url": database_url, "database_pool_size": 4} if database_url else {}
    config = BillingConfig(
        jwt=JWTConfig(secret="b" * 64),
        data_dir=data_dir,
        provider="stripe",
        provider_options=options,
        **extra,
    )
    app = web.Application()
    setup_billing(app, config, environ={})
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}{PREFIX}"
    tokens = TokenFactory(config)
    try:
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            for n in range(PURCHASES):
                async with session.post(
                    base + "/purchase/initiate", headers=tokens.headers(f"u{n}"), json={}
                ) as r:
                    fake.state.confirm((await r.json())["payment_id"], "pm_card_visa")
            initiate = time.perf_counter() - started
            events = [e for e in fake.state.events if e.type == "payment_intent.succeeded"]
            credit, credit_each = await deliver(session, base, fake, events, duplicate=False)
            duplicate, _ = await deliver(session, base, fake, events, duplicate=True)
    finally:
        await runner.cleanup()
        await fake.stop()
    median, p95 = statistics.median(credit_each), sorted(credit_each)[int(PURCHASES * 0.95)]
    return (
        f"{'PostgreSQL' if database_url else 'SQLite'}: initiate {PURCHASES / initiate:.0f}/s; webhook "
        f"credit {PURCHASES / credit:.0f}/s (median {median * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms); "
        f"duplicate {PURCHASES / duplicate:.0f}/s"
    )


async def deliver(
    session: aiohttp.ClientSession, base: str, fake: FakeStripeAPI, events: list[Any], *, duplicate: bool
) -> tuple[float, list[float]]:
    each = []
    started = time.perf_counter()
    for event in events:
        payload = json.dumps(event.view()).encode()
        headers = {"Stripe-Signature": signature(fake.webhook_secret, payload)}
        sent = time.perf_counter()
        async with session.post(base + "/stripe/webhook", data=payload, headers=headers) as reply:
            body = await reply.json()
            assert reply.status == 200, body
            assert body["duplicate"] is duplicate, body
        each.append(time.perf_counter() - sent)
    return time.perf_counter() - started, each


def main() -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        print(asyncio.run(run(sys.argv[1] if len(sys.argv) > 1 else None, Path(data_dir))))


if __name__ == "__main__":
    main()
