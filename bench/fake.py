"""The fake billing backend for scenario C, in its own process: `python -m bench.fake LATENCY_MS`.

Prints `READY <url> <api_key>`; every credit check waits LATENCY_MS first.
"""

from __future__ import annotations

import asyncio
import sys

from ciris_billing_proxy.testing import FakeBillingBackend

from .common import pin


async def main(latency: float) -> None:
    fake = FakeBillingBackend()
    await fake.start()
    fake.inject("latency", endpoint="credits/check", seconds=latency)
    print("READY", fake.url, fake.api_key, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    pin(1)
    asyncio.run(main(float(sys.argv[1]) / 1000))
