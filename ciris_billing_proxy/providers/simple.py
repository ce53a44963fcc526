"""The `simple` provider: N free uses per user, nothing to buy, credit kept on the ledger
(`ciris_billing_proxy.ledger`: SQLite by default, PostgreSQL with a `database_url`).

A user's free uses are a `free` signup grant, made on their first spend (until then their balance
shows it); operators add more, of any kind and with an expiry, through the admin routes or
`ciris-billing-proxy credits grant` (docs/credits.md). Spends may cost more than one use, and
reservations settle a cost known afterwards (`weighted_spends`).

Products (tool credits, `docs/tool-credits.md`) come from `CIRIS_SIMPLE_PRODUCTS`: each its own
free uses per user, kept on the same ledger under the product's name, so a product's spends have the
ledger's guarantees (atomic, idempotent per key, exact across processes on PostgreSQL) and never
touch the interaction credits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..credit_models import unix_to_iso
from ..errors import InsufficientCredit, ProviderUnavailable
from ..identity import Identity
from ..ledger import Account, Balance, Clock, Entry, Ledger, Usage, ledger_for
from ..lru import LRU
from ..models import CreditStatus, Transaction, TransactionPage
from ..ops.logs import FaultLog
from ..products import TOOL_NAME, Product, ToolBalance, valid_tool_name
from ..store import Engine, SQLiteDatabase
from .base import CreditProvider, ProviderContext

#: Fault lines a sweep repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logging.getLogger("ciris_billing_proxy"))

NO_FREE_USES = "No free uses remaining"
LEDGER_FILE = "simple-usage.sqlite3"
#: Distinct balances whose status is kept built.
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

    #: Free uses per user: the signup grant each user gets on their first spend (a change applies to
    #: users who have not spent yet).
    free_uses: int = Field(default=10, ge=0, le=1_000_000)
    #: The `plan_name` shown.
    plan_name: str = Field(default="free", min_length=1, max_length=100)
    #: A SQLite file path, or ":memory:". Default: where `BillingConfig.database_url` says, and without
    #: one `simple-usage.sqlite3` in the data directory.
    database: str | None = None
    #: Products sold per use (free uses only here): name -> `{"free_uses", "price_minor"}`, as JSON in
    #: `CIRIS_SIMPLE_PRODUCTS`. None by default (the demo agent offers `web_search`).
    products: dict[str, ProductSettings] = Field(default_factory=dict)
    #: Seconds between sweeps that announce expired grants (`credit.expired` events); balances are
    #: exact without them.
    expiry_sweep_seconds: float = Field(default=60.0, gt=0, le=86_400)

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
    "CIRIS_SIMPLE_EXPIRY_SWEEP_SECONDS": "expiry_sweep_seconds",
}


class SimpleProvider(CreditProvider):
    name = "simple"

    def __init__(
        self,
        settings: SimpleSettings | None = None,
        *,
        database: str | Path | Engine,
        low_balance_threshold: int | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings or SimpleSettings()
        self._products = {
            name: Product(
                name=name, free_uses=p.free_uses, price_minor=p.price_minor, description=p.description
            )
            for name, p in self.settings.products.items()
        }
        self.ledger = ledger_for(
            database if isinstance(database, Engine) else SQLiteDatabase(database),
            clock=clock,
            low_balance_threshold=low_balance_threshold,
            signup=self._signup,
        )
        # A status depends on the balance alone, and the models are frozen: built (and validated)
        # once per balance, then shared.
        self._statuses: LRU[Balance, CreditStatus] = LRU(STATUSES_KEPT)
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def from_context(cls, context: ProviderContext) -> Self:
        settings = context.settings(SimpleSettings, env=ENV_VARS)
        return cls(
            settings,
            database=context.database(LEDGER_FILE, settings.database),
            low_balance_threshold=context.low_balance_threshold,
        )

    def _signup(self, product: str) -> int:
        if not product:
            return self.settings.free_uses
        found = self._products.get(product)
        return 0 if found is None else found.free_uses

    @property
    def keeps_transactions(self) -> bool:
        return True

    @property
    def weighted_spends(self) -> bool:
        return True

    @property
    def eager_spends(self) -> bool:
        # A spend on SQLite waits only for the database thread's plain future, if at all; PostgreSQL's
        # pool is used within `asyncio.timeout`. A subclass that spends its own way may enter a
        # timeout before it waits: it says so itself.
        return isinstance(self.ledger.engine, SQLiteDatabase) and not _spends_its_own_way(type(self))

    @property
    def credit_ledger(self) -> Ledger:
        return self.ledger

    async def start(self) -> None:
        await self.ledger.open()
        self._sweeper = asyncio.create_task(self._sweep_expiries())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.ledger.close()

    async def _sweep_expiries(self) -> None:
        """Announce expired grants now and then (any number of processes may: each is announced once)."""
        while True:
            try:
                await self.ledger.expire_due()
            except ProviderUnavailable:
                pass  # the database is down (the engine logs it): the next sweep tries again
            except Exception as exc:  # a lost lock race, a constraint: never the end of the sweeps
                faults.warning("Could not announce expired grants: %s", type(exc).__name__)
            await asyncio.sleep(self.settings.expiry_sweep_seconds)

    async def credit_status(self, identity: Identity) -> CreditStatus:
        return self._status(await self.ledger.balance(_account(identity)))

    def _status(self, balance: Balance) -> CreditStatus:
        status = self._statuses.get(balance)
        if status is None:
            status = self._statuses[balance] = self._new_status(balance)
        return status

    def _new_status(self, balance: Balance) -> CreditStatus:
        expiry = balance.soonest_expiry
        return CreditStatus(
            has_credit=balance.total > 0,
            credits_remaining=balance.credits,
            free_uses_remaining=balance.free,
            total_uses=balance.used,
            plan_name=self.settings.plan_name,
            purchase_required=False,
            purchase_options=None,
            reason=None if balance.total else NO_FREE_USES,
            next_expiry_at=unix_to_iso(expiry),
        )

    async def spend(self, identity: Identity, idempotency_key: str) -> CreditStatus:
        balance = await self.ledger.spend(_account(identity), idempotency_key)
        if balance is None:
            raise InsufficientCredit(NO_FREE_USES)
        return self._status(balance)

    async def spend_weighted(self, identity: Identity, idempotency_key: str, cost: int) -> CreditStatus:
        balance = await self.ledger.spend(_account(identity), idempotency_key, cost)
        if balance is None:
            raise InsufficientCredit(f"Not enough credit for a cost of {cost}")
        return self._status(balance)

    async def reserve(self, identity: Identity, idempotency_key: str, amount: int) -> CreditStatus:
        balance = await self.ledger.reserve(_account(identity), idempotency_key, amount)
        if balance is None:
            raise InsufficientCredit(f"Not enough credit to reserve {amount}")
        return self._status(balance)

    async def settle(self, identity: Identity, idempotency_key: str, cost: int, usage: Usage | None) -> None:
        await self.ledger.settle(_account(identity), idempotency_key, cost, usage)

    async def record_usage(self, identity: Identity, idempotency_key: str, usage: Usage) -> None:
        await self.ledger.attach_usage(_account(identity), idempotency_key, usage)

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        await self.ledger.give_back(_account(identity), idempotency_key)

    @property
    def products(self) -> Mapping[str, Product]:
        return self._products

    async def product_balance(self, identity: Identity, product: str) -> ToolBalance:
        balance = await self.ledger.balance(_account(identity, product))
        return ToolBalance(
            product_type=product,
            free_remaining=balance.free,
            paid_credits=balance.credits,
            total_available=balance.total,
            price_minor=self._products[product].price_minor,
            total_uses=balance.used,
        )

    async def spend_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        if await self.ledger.spend(_account(identity, product), idempotency_key) is None:
            raise InsufficientCredit(f"No {product} uses remaining")

    async def give_back_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        await self.ledger.give_back(_account(identity, product), idempotency_key)

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        """Every movement of the user's interaction credit: spends and reservations are charges,
        grants, give-backs and what a settled reservation released are credits; `balance_after` is
        the credit left after it (lines from before grants: the free uses left then)."""
        entries, total = await self.ledger.entries(_account(identity), limit, offset)
        items = [self._transaction(entry) for entry in entries]
        return TransactionPage(transactions=items, total_count=total, has_more=offset + len(items) < total)

    def _transaction(self, entry: Entry) -> Transaction:
        after = entry.balance_after
        if after is None:
            after = max(self.settings.free_uses - entry.used_after, 0)
        usage = entry.usage.model_dump(exclude_none=True) if entry.usage is not None else None
        return Transaction(
            transaction_id=f"{entry.kind}-{entry.id}",
            type="charge" if entry.amount < 0 else "credit",
            amount_minor=entry.amount,
            currency="USD",
            description=DESCRIPTIONS.get(entry.kind, entry.kind),
            created_at=entry.created_at,
            balance_after=after,
            transaction_type=entry.kind,
            metadata=usage or None,
        )


#: What each journal line is, as the transactions say it.
DESCRIPTIONS = {
    "spend": "Agent interaction",
    "give_back": "Use given back: the interaction failed",
    "reserve": "Reserved for an interaction",
    "settle": "Reservation settled: the unused part returned",
    "grant": "Credit granted",
    "clawback": "Credit taken back",
    "expire": "Credit expired",
}


def _account(identity: Identity, product: str = "") -> Account:
    return Account(identity.namespace, identity.user_id, product)


@functools.cache
def _spends_its_own_way(cls: type[SimpleProvider]) -> bool:
    return any(getattr(cls, name) is not getattr(SimpleProvider, name) for name in _SPENDS)


_SPENDS: Final = ("spend", "spend_weighted", "reserve", "spend_product")
