"""The fake backend's request log is bounded and never holds the API key or a token."""

from __future__ import annotations

import aiohttp

from ciris_billing_proxy.testing import FakeBillingBackend

WHO = {"oauth_provider": "oauth:google", "external_id": "118234567890"}


async def test_received_keeps_the_last_n_requests_without_secret_headers() -> None:
    fake = FakeBillingBackend(max_received=50)
    await fake.start()
    try:
        headers = {"X-API-Key": fake.api_key, "Authorization": "Bearer some.jwt.token", "X-Request-ID": "r"}
        async with aiohttp.ClientSession(base_url=fake.url, headers=headers) as session:
            for n in range(150):
                body = {**WHO, "context": {"request_id": str(n)}}
                async with session.post("/v1/billing/credits/check", json=body) as resp:
                    assert resp.status == 200
    finally:
        await fake.stop()
    assert fake.calls["credits/check"] == 150
    assert len(fake.received) == 50
    kept = [body["context"]["request_id"] for _, body, _ in fake.received if body]
    assert kept == [str(n) for n in range(100, 150)]  # the newest, in order
    for _, _, recorded in fake.received:
        assert recorded["X-Request-ID"] == "r"
        assert not {"x-api-key", "authorization"} & {name.lower() for name in recorded}
        assert fake.api_key not in repr(recorded)
        assert "some.jwt.token" not in repr(recorded)


def test_received_is_bounded_by_default() -> None:
    fake = FakeBillingBackend()
    assert fake.received.maxlen == 1000
