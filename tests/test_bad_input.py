"""Bad input on every route: malformed JSON, wrong types, huge bodies, bad ids, provider faults."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciris_billing_proxy import BillingConfig, CreditStatus, Identity
from ciris_billing_proxy.testing import TokenFactory

from .conftest import ClientFactory
from .default_paths import CREDITS, INITIATE, STATUS
from .providers import BrokenProvider, ShopProvider

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def shop(make_client: ClientFactory, config: BillingConfig) -> Client:
    return await make_client(config, provider=ShopProvider())


async def test_initiate_accepts_empty_body_and_empty_object(shop: Client, tokens: TokenFactory) -> None:
    for kwargs in ({}, {"json": {}}, {"json": {"return_url": "https://app.example/done"}}):
        resp = await shop.post(INITIATE, headers=tokens.headers(), **kwargs)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert set(body) == {
            "payment_id",
            "client_secret",
            "amount_minor",
            "currency",
            "uses_purchased",
            "publishable_key",
        }


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"{not json", 400, "Malformed JSON"),
        (b"\xff\xfe", 400, "Malformed JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b'"text"', 422, "JSON object"),
        (b'{"return_url": 5}', 422, "return_url"),
        (b'{"return_url": ""}', 422, "return_url"),
        (b'{"return_url": null, "unknown": 1}', 200, None),
        (b'{"return_url": "' + b"x" * 3000 + b'"}', 422, "return_url"),
    ],
)
async def test_initiate_body_errors(
    shop: Client, tokens: TokenFactory, data: bytes, status: int, words: str | None
) -> None:
    resp = await shop.post(
        INITIATE, data=data, headers={**tokens.headers(), "Content-Type": "application/json"}
    )
    assert resp.status == status
    body = await resp.json()
    if words:
        assert words in body["detail"]


async def test_huge_body_is_refused_with_413(shop: Client, tokens: TokenFactory) -> None:
    resp = await shop.post(INITIATE, data=b"{" + b" " * 100_000 + b"}", headers=tokens.headers())
    assert resp.status == 413
    assert "too large" in (await resp.json())["detail"]


async def test_huge_chunked_body_is_refused_with_413(shop: Client, tokens: TokenFactory) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b" " * 1024

    resp = await shop.post(INITIATE, data=chunks(), headers=tokens.headers())
    assert resp.status == 413


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "é"])
async def test_bad_idempotency_key_header_is_400(shop: Client, tokens: TokenFactory, key: str) -> None:
    resp = await shop.post(INITIATE, json={}, headers={**tokens.headers(), "Idempotency-Key": key})
    assert resp.status == 400
    assert "Idempotency-Key" in (await resp.json())["detail"]


@pytest.mark.parametrize("payment_id", ["pi_unknown", "pi%2F..%2Fx", "a" * 300, "pi_1%00"])
async def test_unknown_or_malformed_payment_id_is_404(
    shop: Client, tokens: TokenFactory, payment_id: str
) -> None:
    resp = await shop.get(f"{STATUS}{payment_id}", headers=tokens.headers())
    assert resp.status == 404
    assert await resp.json() == {"detail": "Payment not found"}


# A trailing newline once passed: `$` in a Python regex also matches before a final "\n".
@pytest.mark.parametrize("payment_id", ["pi%20x", "pi_1%0A"])
async def test_malformed_id_never_reaches_the_provider(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory, payment_id: str
) -> None:
    provider = ShopProvider()
    client = await make_client(config, provider=provider)
    resp = await client.get(f"{STATUS}{payment_id}", headers=tokens.headers())
    assert resp.status == 404
    assert provider.calls.get("purchase_status", 0) == 0


async def test_another_users_payment_is_not_found(shop: Client, tokens: TokenFactory) -> None:
    created = await (await shop.post(INITIATE, json={}, headers=tokens.headers("alice"))).json()
    path = f"{STATUS}{created['payment_id']}"
    own = await shop.get(path, headers=tokens.headers("alice"))
    assert own.status == 200
    other = await shop.get(path, headers=tokens.headers("bob"))
    assert other.status == 404
    assert await other.json() == {"detail": "Payment not found"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", CREDITS),
        ("POST", INITIATE),
        ("GET", f"{STATUS}pi_1"),
    ],
)
async def test_provider_faults_are_503_json(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory, method: str, path: str
) -> None:
    client = await make_client(config, provider=BrokenProvider())
    resp = await client.request(method, path, json={}, headers=tokens.headers())
    assert resp.status == 503
    assert await resp.json() == {"detail": "Billing service unavailable"}


async def test_a_provider_bug_is_503_without_internals(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory, caplog: pytest.LogCaptureFixture
) -> None:
    provider = ShopProvider()
    provider.fail = RuntimeError("secret internals at https://billing.internal")
    client = await make_client(config, provider=provider)
    resp = await client.get(CREDITS, headers=tokens.headers())
    assert resp.status == 503
    text = await resp.text()
    assert "internals" not in text
    assert "Traceback" not in text
    assert "Credit provider 'shop' failed in credit_status" in caplog.text


async def test_an_inconsistent_status_from_a_provider_is_refused(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    class Liar(ShopProvider):
        async def credit_status(self, identity: Identity) -> CreditStatus:
            # has_credit with nothing remaining breaks the rule clients rely on.
            return CreditStatus(
                has_credit=True,
                credits_remaining=0,
                free_uses_remaining=0,
                total_uses=0,
                plan_name="x",
                purchase_required=False,
                purchase_options=None,
            )

    client = await make_client(config, provider=Liar())
    resp = await client.get(CREDITS, headers=tokens.headers())
    assert resp.status == 503
    assert await resp.json() == {"detail": "Billing service unavailable"}
