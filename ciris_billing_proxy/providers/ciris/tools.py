"""Tool credits through the backend's `/v1/tools/*` routes (`docs/tool-credits.md`): balances and
checks, one use per gated tool call (`/v1/tools/charge`, idempotent per request key), and store
purchases of tool packs (`/v1/tools/purchase/verify`).

The backend has no way to give back a tool use: a gated tool call that fails keeps its use spent
(logged with its request key, for an operator to reconcile).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final, TypeVar
from urllib.parse import quote

from pydantic import ValidationError

from ...errors import AlreadyProcessed, InsufficientCredit, InvalidRequest, ProviderUnavailable
from ...identity import Identity
from ...products import Product, ToolBalance, ToolCheck, ToolPurchase, ToolPurchaseRequest
from .backend import BillingBackend
from .transport import Reply

logger = logging.getLogger("ciris_billing_proxy.ciris")

#: What the backend sells per use today (its `PRODUCT_CONFIGS`), with its defaults.
WEB_SEARCH: Final = Product(
    name="web_search",
    free_uses=10,
    price_minor=1,
    description="Search the web for current information",
    packs={"web_search_10": 10, "web_search_50": 50},
)
INVALID_PURCHASE: Final = "Invalid purchase"


class ToolDesk:
    def __init__(self, backend: BillingBackend, products: Mapping[str, Product]) -> None:
        self.backend = backend
        self.products = products

    async def balance(self, identity: Identity, product: str) -> ToolBalance:
        reply = await self.backend.tool_read(
            f"/v1/tools/balance/{quote(product, safe='')}", identity, "tools/balance"
        )
        return _parse(ToolBalance, self._ok(reply, "tools/balance"))

    async def balances(self, identity: Identity) -> list[ToolBalance]:
        reply = await self.backend.tool_read("/v1/tools/balance", identity, "tools/balance")
        body = self._ok(reply, "tools/balance")
        items = body.get("balances")
        if not isinstance(items, list):
            raise ProviderUnavailable("malformed tool balances", maybe_applied=False)
        # Only the products this agent declares, in its order (the backend may sell more).
        by_name = {item.get("product_type"): item for item in items if isinstance(item, dict)}
        return [_parse(ToolBalance, by_name[name]) for name in self.products if name in by_name]

    async def check(self, identity: Identity, product: str) -> ToolCheck:
        reply = await self.backend.tool_read(
            f"/v1/tools/check/{quote(product, safe='')}", identity, "tools/check"
        )
        return _parse(ToolCheck, self._ok(reply, "tools/check"))

    async def spend(self, identity: Identity, product: str, request_key: str) -> None:
        reply = await self.backend.tool_charge(identity, product, request_key)
        if reply.status == 402:
            raise InsufficientCredit(f"No {product} uses remaining")
        if reply.status != 200:
            raise self.backend.unexpected("tools/charge", reply)

    async def give_back(self, identity: Identity, product: str, request_key: str) -> None:
        logger.warning(
            "The billing backend cannot give back a %s use: the one spent under request key %s stays spent",
            product,
            request_key,
        )

    async def verify_purchase(self, identity: Identity, purchase: ToolPurchaseRequest) -> ToolPurchase:
        fields = {
            "product_id": purchase.product_id,
            "purchase_token": purchase.purchase_token,
            "tool_name": purchase.tool_name,
        }
        reply = await self.backend.tool_purchase(identity, fields)
        if reply.status == 409:
            raise AlreadyProcessed(reply.detail or "Purchase already processed")
        if reply.status in (400, 422):
            raise InvalidRequest(reply.detail or INVALID_PURCHASE)
        return _parse(ToolPurchase, self._ok(reply, "tools/purchase/verify"))

    def _ok(self, reply: Reply, endpoint: str) -> dict[str, object]:
        if reply.status != 200:
            raise self.backend.unexpected(endpoint, reply)
        body: dict[str, object] = reply.body
        return body


M = TypeVar("M", ToolBalance, ToolCheck, ToolPurchase)


def _parse(model: type[M], body: object) -> M:
    try:
        return model.model_validate(body, strict=False)
    except ValidationError:
        logger.error("Billing backend tool route answered a body that does not fit the contract")
        raise ProviderUnavailable("malformed tool reply", maybe_applied=False) from None
