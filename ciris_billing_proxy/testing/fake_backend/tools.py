"""The fake backend's tool credits (`docs/billing-backend.md` 3.9, CIRIS Billing `tool_routes.py` and
`product_inventory.py`): per account and product, free uses (initial, plus a daily top-up capped at
initial + daily), paid credits, and uses so far; charges take product free, then product paid, then
the account's main pool (`paid_credits -= price_minor`); a repeated charge key answers the first
result. Tool purchases (`/v1/tools/purchase/verify`) are shaped after what the CIRIS agent sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final

from .ledger import INVALID_PURCHASE_PREFIX, BackendError, Ledger


@dataclass
class ToolProduct:
    free_initial: int = 10
    free_daily: int = 3
    price_minor: int = 1


@dataclass
class Inventory:
    free_remaining: int
    last_refresh: date
    paid_credits: int = 0
    total_uses: int = 0


#: Store product id -> (product, uses): the fake's Google Play packs of tool credits (a guess at
#: CIRIS's naming, `web_search_10`; the backend's public source does not list them yet).
TOOL_PACKS: Final = {"web_search_10": ("web_search", 10), "web_search_50": ("web_search", 50)}


@dataclass
class ToolBook:
    """Kept beside the `Ledger`, under its lock."""

    ledger: Ledger
    products: dict[str, ToolProduct] = field(default_factory=lambda: {"web_search": ToolProduct()})
    inventories: dict[tuple[tuple[str, str], str], Inventory] = field(default_factory=dict)
    #: (account, idempotency key) -> the charge's reply: a repeat answers it again.
    charges: dict[tuple[tuple[str, str], str], dict[str, Any]] = field(default_factory=dict)
    purchases: set[str] = field(default_factory=set)

    def _inventory(self, key: tuple[str, str], product: str) -> Inventory:
        if product not in self.products:
            raise BackendError(400, f"Unknown product type: {product}")
        config = self.products[product]
        if key not in self.ledger.accounts:
            self.ledger._create(key, self.ledger.pricing.free_uses_per_account, {})
        today = self.ledger.now().date()
        inventory = self.inventories.get((key, product))
        if inventory is None:
            inventory = self.inventories[(key, product)] = Inventory(config.free_initial, today)
        elif today > inventory.last_refresh:
            inventory.free_remaining = min(
                inventory.free_remaining + config.free_daily, config.free_initial + config.free_daily
            )
            inventory.last_refresh = today
        return inventory

    def balance(self, key: tuple[str, str], product: str) -> dict[str, Any]:
        with self.ledger.lock:
            inventory = self._inventory(key, product)
            price = self.products[product].price_minor
            return {
                "product_type": product,
                "free_remaining": inventory.free_remaining,
                "paid_credits": inventory.paid_credits,
                "total_available": inventory.free_remaining + inventory.paid_credits,
                "price_minor": price,
                "total_uses": inventory.total_uses,
                "main_pool_credits": self.ledger.accounts[key].paid_credits // max(price, 1),
            }

    def balances(self, key: tuple[str, str]) -> dict[str, Any]:
        with self.ledger.lock:
            return {"balances": [self.balance(key, product) for product in self.products]}

    def check(self, key: tuple[str, str], product: str) -> dict[str, Any]:
        with self.ledger.lock:
            balance = self.balance(key, product)
            return {
                "has_credit": balance["total_available"] > 0 or balance["main_pool_credits"] > 0,
                "product_type": product,
                "free_remaining": balance["free_remaining"],
                "paid_credits": balance["paid_credits"],
                "total_available": balance["total_available"],
            }

    def charge(self, body: dict[str, Any]) -> dict[str, Any]:
        key, product = (body["oauth_provider"], body["external_id"]), body["product_type"]
        with self.ledger.lock:
            inventory = self._inventory(key, product)
            idem = body.get("idempotency_key")
            if idem is not None and (key, idem) in self.charges:
                return self.charges[(key, idem)]
            account = self.ledger.accounts[key]
            price = self.products[product].price_minor
            used_free = used_paid = False
            cost = 0
            if inventory.free_remaining > 0:
                inventory.free_remaining -= 1
                used_free = True
            elif inventory.paid_credits > 0:
                inventory.paid_credits -= 1
                used_paid, cost = True, price
            elif account.paid_credits >= price:
                account.paid_credits -= price
                account.balance_minor = account.paid_credits
                used_paid, cost = True, price
            else:
                raise BackendError(
                    402, f"Insufficient credits. Balance: {inventory.paid_credits}, Required: 1"
                )
            inventory.total_uses += 1
            reply = {
                "success": True,
                "has_credit": inventory.free_remaining + inventory.paid_credits > 0,
                "used_free": used_free,
                "used_paid": used_paid,
                "cost_minor": cost,
                "free_remaining": inventory.free_remaining,
                "paid_credits": inventory.paid_credits,
                "total_uses": inventory.total_uses,
            }
            if idem is not None:
                self.charges[(key, idem)] = reply
            return reply

    def verify_purchase(self, key: tuple[str, str], body: dict[str, Any]) -> dict[str, Any]:
        pack = TOOL_PACKS.get(body["product_id"])
        if pack is None or pack[0] != body["tool_name"]:
            raise BackendError(400, f"Unknown product ID: {body['product_id']}")
        token = body["purchase_token"].strip()
        if token.startswith(INVALID_PURCHASE_PREFIX):
            raise BackendError(400, "Purchase not valid: state=1")
        with self.ledger.lock:
            inventory = self._inventory(key, pack[0])
            if token in self.purchases:
                raise BackendError(409, "Purchase already processed")
            self.purchases.add(token)
            inventory.paid_credits += pack[1]
            return {
                "success": True,
                "product_type": pack[0],
                "credits_added": pack[1],
                "new_balance": inventory.free_remaining + inventory.paid_credits,
                "message": f"Added {pack[1]} {pack[0]} credits",
            }
