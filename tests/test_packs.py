"""Packs on the provider interface: `purchase/initiate`'s optional `"pack"`, checked before the
provider is asked; providers that declare none (written before packs) keep their signature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ciris_billing_proxy import BillingConfig, Identity, PurchaseInitiated
from ciris_billing_proxy.models import CreditPack
from ciris_billing_proxy.testing import TokenFactory

from .conftest import ClientFactory
from .default_paths import CAPABILITIES, INITIATE
from .providers import ShopProvider

PACKS = (
    CreditPack(id="one", uses=1, price_minor=100, currency="usd"),
    CreditPack(id="ten", uses=10, price_minor=900, currency="USD"),
)


class PackShop(ShopProvider):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str | None] = []

    @property
    def packs(self) -> Sequence[CreditPack]:
        return PACKS

    async def initiate_purchase(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None, pack: str | None = None
    ) -> PurchaseInitiated:
        self.asked.append(pack)
        return await super().initiate_purchase(identity, return_url, idempotency_key)


async def test_a_provider_without_packs_is_never_given_one(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, provider=ShopProvider())  # its initiate takes no pack
    headers = tokens.headers(email="ann@example.com")
    assert (await client.post(INITIATE, headers=headers, json={})).status == 200
    resp = await client.post(INITIATE, headers=headers, json={"pack": "ten"})
    assert (resp.status, await resp.json()) == (400, {"detail": "This agent sells no packs: leave out pack"})
    assert "packs" not in await (await client.get(CAPABILITIES, headers=headers)).json()


async def test_a_pack_is_checked_then_passed_on(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    provider = PackShop()
    client = await make_client(config, provider=provider)
    headers = tokens.headers(email="ann@example.com")
    capabilities: dict[str, Any] = await (await client.get(CAPABILITIES, headers=headers)).json()
    assert capabilities["packs"] == [
        {"id": "one", "uses": 1, "price_minor": 100, "currency": "USD"},
        {"id": "ten", "uses": 10, "price_minor": 900, "currency": "USD"},
    ]
    assert (await client.post(INITIATE, headers=headers, json={"pack": "ten"})).status == 200
    assert (await client.post(INITIATE, headers=headers, json={})).status == 200
    resp = await client.post(INITIATE, headers=headers, json={"pack": "twenty"})
    assert (resp.status, await resp.json()) == (400, {"detail": "Unknown pack; choose one of: one, ten"})
    for bad in ("", "a b", 5, "x" * 65):
        resp = await client.post(INITIATE, headers=headers, json={"pack": bad})
        assert resp.status == 422, bad
    assert provider.asked == ["ten", None]
