"""The `stripe` provider: credit packs sold through the seller's own Stripe account, kept in the
package's credit ledger (a purchase is a `paid` grant, free uses a `free` signup grant), no billing
backend needed (docs/stripe-provider.md).

A facade over parts with one job each:
  settings.py    the keys, the webhook secret, the packs and free uses (`CIRIS_STRIPE_*`)
  api.py         Stripe through the official library's async client
  sales.py       starting a purchase (once per key or double click: `providers.purchase_starts`)
  settlement.py  crediting once, ending, clawing back after refunds and disputes
  webhooks.py    `POST {prefix}/stripe/webhook`: signed events, each handled once
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final, Self

from ...credit_models import unix_to_iso
from ...errors import InsufficientCredit
from ...identity import Identity
from ...ledger import Account, Balance, Entry, Ledger, Usage, ledger_for
from ...models import (
    CreditPack,
    CreditStatus,
    PurchaseInitiated,
    PurchaseStatus,
    Transaction,
    TransactionPage,
)
from ...store import Engine, SQLiteDatabase, payment_store, replay_store
from ...store.stripe_events import stripe_event_store
from ...store.stripe_payments import stripe_payment_store
from ...store.sweeper import Sweeper
from ..base import CreditProvider, ProviderContext, ProviderRoute
from ..ciris.sealing import ReplySeal
from ..packs import Packs
from ..purchase_starts import PurchaseStarts, StartLimits
from ..simple import DESCRIPTIONS
from .api import StripeAPI
from .sales import StripeSales
from .settings import StripeSettings
from .settlement import Settlement
from .webhooks import WEBHOOK, WebhookRoute

RECORDS_FILE: Final = "stripe.sqlite3"
NO_CREDIT: Final = "No credits remaining"


class StripeProvider(CreditProvider):
    name = "stripe"

    def __init__(
        self,
        settings: StripeSettings,
        *,
        database: str | Path | Engine,
        agent_id: str = "agent",
        low_balance_threshold: int | None = None,
    ) -> None:
        self.settings = settings
        self.packs_on_sale = Packs(settings.packs)
        engine = database if isinstance(database, Engine) else SQLiteDatabase(database)
        # One engine for every record: the ledger opens and closes it; the others migrate on it.
        self.ledger = ledger_for(
            engine,
            low_balance_threshold=low_balance_threshold,
            signup=lambda product: settings.free_uses if product == "" else 0,
        )
        # Balances are exact without it: it announces expired grants (`credit.expired`), once each.
        self._expiries = Sweeper(self.ledger.expire_due, "expired grants")
        self.payments = payment_store(engine)
        self.replays = replay_store(engine)
        self.events = stripe_event_store(engine)
        self.records = stripe_payment_store(engine)
        self.api = StripeAPI(settings, agent_id)
        self.sales = StripeSales(
            self.api, self.packs_on_sale, self.payments, self.records, settings.publishable_key
        )
        limits = StartLimits(
            start_seconds=settings.timeout_seconds,
            reuse_seconds=settings.purchase_reuse_seconds,
            max_per_user=settings.purchase_max_per_user,
            window_seconds=settings.purchase_window_seconds,
        )
        # Replies carry client secrets: sealed with a key derived from the Stripe secret key, which
        # every process of the agent has (a new key only means a kept reply starts anew).
        seal = ReplySeal(settings.secret_key.get_secret_value())
        self.starts = PurchaseStarts(self.sales, self.payments, self.replays, seal, limits)
        self.settlement = Settlement(self.api, self.ledger, self.payments, self.records)
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        self.webhook = WebhookRoute(
            secret, settings.webhook_tolerance_seconds, self.events, self.settlement.handle
        )

    @classmethod
    def from_context(cls, context: ProviderContext) -> Self:
        settings = StripeSettings.from_context(context)
        return cls(
            settings,
            database=context.database(RECORDS_FILE, settings.database),
            agent_id=context.agent_id,
            low_balance_threshold=context.low_balance_threshold,
        )

    @property
    def purchases_enabled(self) -> bool:
        return True

    @property
    def keeps_transactions(self) -> bool:
        return True

    @property
    def weighted_spends(self) -> bool:
        return True

    @property
    def credit_ledger(self) -> Ledger:
        return self.ledger

    @property
    def packs(self) -> Sequence[CreditPack]:
        return self.packs_on_sale.all

    def routes(self) -> Sequence[ProviderRoute]:
        return (ProviderRoute(WEBHOOK, self.webhook.receive),)

    async def start(self) -> None:
        await self.ledger.open()
        engine = self.ledger.engine
        await engine.migrate(self.payments.schema)
        await self.replays.open()
        await self.events.open()
        await self.records.open()
        await self.api.start()
        self.starts.start()
        self._expiries.start()

    async def stop(self) -> None:
        await self._expiries.aclose()
        await self.webhook.aclose()
        await self.starts.aclose()
        await self.api.stop()
        await self.ledger.close()

    async def health(self) -> str | None:
        await self.api.health()
        return None

    async def credit_status(self, identity: Identity) -> CreditStatus:
        return self._status(await self.ledger.balance(_account(identity)))

    def _status(self, balance: Balance) -> CreditStatus:
        has_credit = balance.total > 0
        expiry = balance.soonest_expiry
        return CreditStatus(
            has_credit=has_credit,
            credits_remaining=balance.credits,
            free_uses_remaining=balance.free,
            total_uses=balance.used,
            plan_name=self.settings.plan_name,
            purchase_required=not has_credit,
            purchase_options=None if has_credit else self.packs_on_sale.default.options,
            reason=None if has_credit else NO_CREDIT,
            next_expiry_at=unix_to_iso(expiry),
        )

    async def spend(self, identity: Identity, idempotency_key: str) -> CreditStatus:
        return await self.spend_weighted(identity, idempotency_key, 1)

    async def spend_weighted(self, identity: Identity, idempotency_key: str, cost: int) -> CreditStatus:
        balance = await self.ledger.spend(_account(identity), idempotency_key, cost)
        if balance is None:
            raise InsufficientCredit(NO_CREDIT if cost == 1 else f"Not enough credit for a cost of {cost}")
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

    async def initiate_purchase(
        self,
        identity: Identity,
        return_url: str | None,
        idempotency_key: str | None,
        pack: str | None = None,
    ) -> PurchaseInitiated:
        return await self.starts.initiate(identity, return_url, idempotency_key, pack)

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        return await self.settlement.status(identity, payment_id)

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        entries, total = await self.ledger.entries(
            Account(identity.namespace, identity.user_id), limit, offset
        )
        items = [self._transaction(entry) for entry in entries]
        return TransactionPage(transactions=items, total_count=total, has_more=offset + len(items) < total)

    def _transaction(self, entry: Entry) -> Transaction:
        """As the `simple` provider's, with purchases, refunds and disputes said as such."""
        usage = entry.usage.model_dump(exclude_none=True) if entry.usage is not None else None
        return Transaction(
            transaction_id=f"{entry.kind}-{entry.id}",
            type="charge" if entry.amount < 0 else "credit",
            amount_minor=entry.amount,
            currency=self.packs_on_sale.default.currency,
            description=REASONS.get(entry.reason or "", DESCRIPTIONS.get(entry.kind, entry.kind)),
            created_at=entry.created_at,
            balance_after=entry.balance_after or 0,
            transaction_type=entry.kind,
            metadata=usage or None,
        )


#: Journal lines whose reason says more than their kind.
REASONS: Final = {
    "purchase": "Credits purchased",
    "refund": "Credits taken back: the purchase was refunded",
    "chargeback": "Credits taken back: the payment was disputed",
}


def _account(identity: Identity) -> Account:
    return Account(identity.namespace, identity.user_id)
