"""Single-flight through the whole stack: concurrent requests share backend calls, counted by the
fake backend itself, over real HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import with_options
from .conftest import ClientFactory
from .default_paths import CREDITS


async def test_concurrent_requests_make_one_backend_call_per_user(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    client = await make_client(ciris_billing_config)
    ciris_fake_backend.inject("latency", endpoint="credits/check", seconds=0.05)
    headers = [ciris_tokens.headers(f"user-{i}") for i in range(20)]
    replies = await asyncio.gather(*(client.get(CREDITS, headers=h) for h in headers for _ in range(10)))
    assert [r.status for r in replies] == [200] * 200
    assert ciris_fake_backend.calls["credits/check"] == 20
    again = await asyncio.gather(*(client.get(CREDITS, headers=h) for h in headers))
    assert all(r.status == 200 for r in again)
    assert ciris_fake_backend.calls["credits/check"] == 20  # served from the cache


async def test_a_backend_failure_is_shared_and_not_cached(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    config = with_options(ciris_billing_config, max_retries=0)
    client = await make_client(config)
    ciris_fake_backend.inject("latency", endpoint="credits/check", seconds=0.05, times=1)
    ciris_fake_backend.inject("error_500", endpoint="credits/check", times=1)
    auth = ciris_tokens.headers("solo")
    replies: list[Any] = await asyncio.gather(*(client.get(CREDITS, headers=auth) for _ in range(10)))
    assert [r.status for r in replies] == [503] * 10
    assert ciris_fake_backend.calls["credits/check"] == 1
    assert (await client.get(CREDITS, headers=auth)).status == 200
    assert ciris_fake_backend.calls["credits/check"] == 2
