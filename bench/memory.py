"""Memory of 100,000 cached identities: `python -m bench.memory [N]`.

Builds the plugin as a host would, then has N distinct users each present a token and read their
credits once, so both the verified-token cache and the credit cache hold N entries. The users'
statuses vary (550 distinct replies: 0-10 free uses times 0-49 paid credits), as real ones do.
Prints one JSON line with RSS before and after (MB) and the peak.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from ciris_billing_proxy import (
    BillingConfig,
    CreditProvider,
    CreditStatus,
    Identity,
    JWTConfig,
    setup_billing,
)

from .common import SECRET, rss_mb, token


class CountingProvider(CreditProvider):
    """Answers like a real provider, without storage, so only the proxy's own memory counts."""

    async def credit_status(self, identity: Identity) -> CreditStatus:
        n = int(identity.user_id.rsplit("-", 1)[1])
        free, paid = n % 11, (n // 11) % 50
        return CreditStatus(
            has_credit=free + paid > 0,
            credits_remaining=paid,
            free_uses_remaining=free,
            total_uses=10 - free,
            plan_name="free",
            purchase_required=False,
            purchase_options=None,
        )

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        raise NotImplementedError

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        raise NotImplementedError


async def main(n: int) -> dict[str, float]:
    config = BillingConfig(
        jwt=JWTConfig(secret=SECRET), data_dir=Path(tempfile.mkdtemp()), cache_max_entries=max(n, 1)
    )
    service = setup_billing(web.Application(), config, provider=CountingProvider(), environ={})
    tokens = [token(f"user-{i:06d}") for i in range(n)]
    gc.collect()
    before = rss_mb()
    for raw in tokens:
        identity = service.verifier.verify(raw)
        await service.credit_status(identity)
    gc.collect()
    after = rss_mb()
    return {
        "identities": float(len(service.cache)),
        "rss_before_mb": before,
        "rss_after_mb": after,
        "delta_mb": after - before,
        "peak_rss_mb": rss_mb("VmHWM"),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))), flush=True)
