"""The `simple` provider: N free uses per user, nothing to buy, a SQLite ledger that survives restarts.

Products (tool credits, `docs/tool-credits.md`) come from `CIRIS_SIMPLE_PRODUCTS`: each its own free
uses per user, kept in the same usage ledger under a product-qualified namespace, so a product's spends
have the ledger's guarantees (atomic, idempotent per key, exact across processes on PostgreSQL) and
never touch the interaction uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import InsufficientCredit
from ..identity import Identity
from ..lru import LRU
from ..models import CreditStatus, Transaction, TransactionPage
from ..products import TOOL_NAME, Product, ToolBalance, valid_tool_name
from ..store import Engine, SQLiteDatabase, usage_ledger
from .base import CreditProvider, ProviderContext

NO_FREE_USES = "No free uses remaining"
LEDGER_FILE = "simple-usage.sqlite3"
#: Distinct use counts whose status is kept built.
STATUSES_KEPT = 1024


class ProductSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Free uses of this product per user.
    free_uses: int = Field(default=0, ge=0, le=1_000_000)
    price_minor: int = Field(default=0, ge=0, le=10_000_000)
    description: str = Field(default="", max_length=500)


class SimpleSettings(BaseModel):
    """Options of the `simple` provider (`BillingConfig.provider_options`, or the environment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Free uses per user.
    free_uses: int = Field(default=10, ge=0, le=1_000_000)
    #: The `plan_name` shown.
    plan_name: str = Field(default="free", min_length=1, max_length=100)
    #: A SQLite file path, or ":memory:". Default: where `BillingConfig.database_url` says, and without
    #: one `simple-usage.sqlite3` in the data directory.
    database: str | None = None
    #: Products sold per use (free uses only here): name -> `{"free_uses", "price_minor"}`, as JSON in
    #: `CIRIS_SIMPLE_PRODUCTS`. None by default (the demo agent offers `web_search`).
    products: dict[str, ProductSettings] = Field(default_factory=dict)

    @field_validator("products", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("must be a JSON object: name -> {free_uses, price_minor}") from None
        return value

    @field_validator("products")
    @classmethod
    def _names(cls, value: dict[str, ProductSettings]) -> dict[str, ProductSettings]:
        for name in value:
            if not valid_tool_name(name):
                raise ValueError(f"product names must match {TOOL_NAME.pattern}")
        return value


#: Environment variable -> option name.
ENV_VARS = {
    "CIRIS_SIMPLE_FREE_USES": "free_uses",
    "CIRIS_SIMPLE_PLAN_NAME": "plan_name",
    "CIRIS_SIMPLE_DATABASE": "database",
    "CIRIS_SIMPLE_PRODUCTS": "products",
}
#: Between a product's name and the identity namespace in the ledger's namespace column: identity
#: namespaces never hold it (they come from token claims), so no user's uses can collide with it.
PRODUCT_SEPARATOR: Final = "\x1f"


class SimpleProvider(CreditProvider):
    name = "simple"

    def __init__(self, settings: SimpleSettings | None = None, *, database: str | Path | Engine) -> None:
        self.settings = settings or SimpleSettings()
        self.ledger = usage_ledger(database if isinstance(database, Engine) else SQLiteDatabase(database))
        # A status depends on the use count alone, and the models are frozen: built (and validated)
        # once per count, then shared.
        self._statuses: LRU[int, CreditStatus] = LRU(STATUSES_KEPT)
        self._products = {
            name: Product(
                name=name, free_uses=p.free_uses, price_minor=p.price_minor, description=p.description
            )
            for name, p in self.settings.products.items()
        }

    @classmethod
    def from_context(cls, context: ProviderContext) -> Self:
        settings = context.settings(SimpleSettings, env=ENV_VARS)
        return cls(settings, database=context.database(LEDGER_FILE, settings.database))

    @property
    def keeps_transactions(self) -> bool:
        return True

    @property
    def events_engine(self) -> Engine:
        return self.ledger.engine

    async def start(self) -> None:
        await self.ledger.open()

    async def stop(self) -> None:
        await self.ledger.close()

    async def credit_status(self, identity: Identity) -> CreditStatus:
        used = await self.ledger.used(identity.namespace, identity.user_id)
        return self._status(used)

    def _status(self, used: int) -> CreditStatus:
        status = self._statuses.get(used)
        if status is None:
            status = self._statuses[used] = self._new_status(used)
        return status

    def _new_status(self, used: int) -> CreditStatus:
        remaining = max(self.settings.free_uses - used, 0)
        return CreditStatus(
            has_credit=remaining > 0,
            credits_remaining=0,
            free_uses_remaining=remaining,
            total_uses=used,
            plan_name=self.settings.plan_name,
            purchase_required=False,
            purchase_options=None,
            reason=None if remaining else NO_FREE_USES,
        )

    async def spend(self, identity: Identity, idempotency_key: str) -> CreditStatus:
        used = await self.ledger.spend_counted(
            identity.namespace, identity.user_id, idempotency_key, self.settings.free_uses
        )
        if used is None:
            raise InsufficientCredit(NO_FREE_USES)
        return self._status(used)

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        await self.ledger.give_back(identity.namespace, identity.user_id, idempotency_key)

    @property
    def products(self) -> Mapping[str, Product]:
        return self._products

    async def product_balance(self, identity: Identity, product: str) -> ToolBalance:
        used = await self.ledger.used(_product_namespace(identity, product), identity.user_id)
        free = max(self._products[product].free_uses - used, 0)
        return ToolBalance(
            product_type=product,
            free_remaining=free,
            paid_credits=0,
            total_available=free,
            price_minor=self._products[product].price_minor,
            total_uses=used,
        )

    async def spend_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        limit = self._products[product].free_uses
        namespace = _product_namespace(identity, product)
        if not await self.ledger.spend(namespace, identity.user_id, idempotency_key, limit):
            raise InsufficientCredit(f"No {product} uses remaining")

    async def give_back_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        await self.ledger.give_back(_product_namespace(identity, product), identity.user_id, idempotency_key)

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        """Each use is a charge of 1 and each give-back a credit of 1; `balance_after` is the free
        uses left after it."""
        events, total = await self.ledger.events(identity.namespace, identity.user_id, limit, offset)
        items = [
            Transaction(
                transaction_id=f"use-{event_id}",
                type="charge" if kind == "use" else "credit",
                amount_minor=-1 if kind == "use" else 1,
                currency="USD",
                description="Agent interaction"
                if kind == "use"
                else "Use given back: the interaction failed",
                created_at=created_at,
                balance_after=max(self.settings.free_uses - used_after, 0),
            )
            for event_id, kind, used_after, created_at in events
        ]
        return TransactionPage(transactions=items, total_count=total, has_more=offset + len(items) < total)


def _product_namespace(identity: Identity, product: str) -> str:
    return f"{product}{PRODUCT_SEPARATOR}{identity.namespace}"
