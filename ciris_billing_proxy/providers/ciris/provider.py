"""The `ciris` provider: paid credits through the CIRIS Billing backend (`docs/billing-backend.md`).

A facade over parts with one job each:
  accounts.py    who a user is to the shared backend, and namespaced idempotency keys
  backend.py     the backend's endpoints as typed calls (over transport.py: budgets, retries)
  wire.py        the backend's reply shapes and their mapping onto the UI contract
  charges.py     charges for gated interactions, and exact refunds when those fail
  purchases.py   Stripe purchases: ownership, replays, double clicks, status truth
  sealing.py     purchase replies encrypted at rest (they carry Stripe client secrets)
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Self

from pydantic import ValidationError

from ...errors import ProviderUnavailable
from ...id_token import IdToken
from ...identity import Identity
from ...models import (
    AppStorePurchase,
    CreditStatus,
    GooglePlayPurchase,
    PurchaseInitiated,
    PurchaseStatus,
    StoreVerification,
    TransactionPage,
)
from ...products import Product, ToolBalance, ToolCheck, ToolPurchase, ToolPurchaseRequest
from ...store import Engine, SQLiteDatabase, payment_store, replay_store
from ..base import CreditProvider, ProviderContext
from .accounts import BackendAccounts
from .agent_token import SIGNAL_NAME, AgentToken
from .backend import BillingBackend
from .charges import ChargeBook
from .purchases import PurchaseDesk
from .sealing import ReplySeal
from .settings import CirisSettings
from .tools import WEB_SEARCH, ToolDesk
from .transport import Reply
from .wire import NOT_VERIFIED, public_transaction, refused, to_credit_status, to_store_verification

logger = logging.getLogger("ciris_billing_proxy.ciris")

PAYMENTS_FILE: Final = "ciris-payments.sqlite3"
#: The readiness check's budget for its one backend call (below the service's own limit).
HEALTH_SECONDS: Final = 2.0


def agent_token_of(settings: CirisSettings, context: ProviderContext) -> AgentToken:
    """Where the agent's token comes from and where a refusal is signalled: the settings, else the
    CIRIS layout (`$CIRIS_HOME/.env`, `$CIRIS_HOME/.token_refresh_needed`)."""
    home = context.environ.get("CIRIS_HOME")
    env_file = Path(settings.env_file) if settings.env_file else (Path(home) / ".env" if home else None)
    if settings.refresh_signal_file:
        signal = Path(settings.refresh_signal_file)
    elif home:
        signal = Path(home) / SIGNAL_NAME
    elif env_file is not None:
        signal = env_file.with_name(SIGNAL_NAME)
    else:
        signal = context.data_dir / SIGNAL_NAME
    return AgentToken(context.environ, env_file, signal)


class CirisProvider(CreditProvider):
    name = "ciris"

    def __init__(
        self,
        settings: CirisSettings,
        *,
        database: str | Path | Engine,
        agent_id: str = "agent",
        agent_token: AgentToken | None = None,
    ) -> None:
        self.settings = settings
        self.agent_token = agent_token
        self.backend = BillingBackend(settings, BackendAccounts(agent_id))
        if agent_token is not None:
            self.backend.on_agent_token_refused = agent_token.refused
        engine = database if isinstance(database, Engine) else SQLiteDatabase(database)
        # One engine for both records: the payment store opens and closes it.
        self.payments = payment_store(engine)
        self.replays = replay_store(engine)
        self.charges = ChargeBook(self.backend)
        # Without an API key (id_token mode) nothing is sold through Stripe, so nothing is ever
        # sealed: a random secret keeps the desk whole without a key to derive one from.
        sealing = settings.replay_secrets or (secrets.token_urlsafe(32),)
        self.purchases = PurchaseDesk(self.backend, self.payments, self.replays, ReplySeal(*sealing))
        self.tools = ToolDesk(self.backend, {WEB_SEARCH.name: WEB_SEARCH})

    @classmethod
    def from_context(cls, context: ProviderContext) -> Self:
        settings = CirisSettings.from_context(context)
        return cls(
            settings,
            database=context.database(PAYMENTS_FILE, settings.database),
            agent_id=context.agent_id,
            agent_token=agent_token_of(settings, context) if settings.id_token_from_env else None,
        )

    def agent_id_token(self) -> IdToken | None:
        return None if self.agent_token is None else self.agent_token.current()

    # In id_token mode the backend takes the user's token only for checks and store verifications:
    # Stripe purchases, charges and the listing need the API key.
    @property
    def purchases_enabled(self) -> bool:
        return not self.settings.id_token_mode

    @property
    def keeps_transactions(self) -> bool:
        return not self.settings.id_token_mode

    @property
    def gate_charges(self) -> bool:
        return not self.settings.id_token_mode

    @property
    def id_token_required(self) -> bool:
        return self.settings.id_token_mode

    @property
    def google_play_enabled(self) -> bool:
        return True

    @property
    def apple_storekit_enabled(self) -> bool:
        return True

    async def start(self) -> None:
        await self.payments.open()
        await self.replays.open()
        await self.backend.start()
        self.purchases.start()

    async def health(self) -> str | None:
        return await self.backend.health(HEALTH_SECONDS)

    async def stop(self) -> None:
        await self.purchases.aclose()
        await self.backend.stop()
        await self.payments.close()

    async def credit_status(self, identity: Identity) -> CreditStatus:
        return to_credit_status(await self.backend.check(identity))

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        await self.charges.spend(identity, idempotency_key)

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        await self.charges.give_back(identity, idempotency_key)

    async def give_back_owed(self, identity: Identity, idempotency_key: str, owed_since: float) -> None:
        await self.charges.give_back_owed(identity, idempotency_key, owed_since)

    async def initiate_purchase(
        self,
        identity: Identity,
        return_url: str | None,
        idempotency_key: str | None,
        pack: str | None = None,
    ) -> PurchaseInitiated:
        # The backend sells one pack: declaring no `packs`, this is never asked for another.
        return await self.purchases.initiate(identity, return_url, idempotency_key)

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        return await self.purchases.status(identity, payment_id)

    async def verify_google_play(self, identity: Identity, purchase: GooglePlayPurchase) -> StoreVerification:
        fields = {
            "purchase_token": purchase.purchase_token,
            "product_id": purchase.product_id,
            "package_name": purchase.package_name,
        }
        return self._verification(await self.backend.verify_store("google-play", identity, fields))

    async def verify_app_store(self, identity: Identity, purchase: AppStorePurchase) -> StoreVerification:
        fields = {"transaction_id": purchase.transaction_id}
        if purchase.product_id is not None:
            fields["product_id"] = purchase.product_id
        return self._verification(await self.backend.verify_store("apple-storekit", identity, fields))

    # -- tool credits: tools.py --------------------------------------------------------------------
    @property
    def products(self) -> Mapping[str, Product]:
        return self.tools.products

    @property
    def product_purchases_enabled(self) -> bool:
        return True

    async def product_balance(self, identity: Identity, product: str) -> ToolBalance:
        return await self.tools.balance(identity, product)

    async def product_balances(self, identity: Identity) -> list[ToolBalance]:
        return await self.tools.balances(identity)

    async def product_check(self, identity: Identity, product: str) -> ToolCheck:
        return await self.tools.check(identity, product)

    async def spend_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        await self.tools.spend(identity, product, idempotency_key)

    async def give_back_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        await self.tools.give_back(identity, product, idempotency_key)

    async def verify_product_purchase(
        self, identity: Identity, purchase: ToolPurchaseRequest
    ) -> ToolPurchase:
        return await self.tools.verify_purchase(identity, purchase)

    def _verification(self, reply: Reply) -> StoreVerification:
        """The backend's answer as the apps read it: its refusals (400 invalid purchase or unknown
        product, a 422 on the token's shape, a 404/403 on the account) are `success: false`."""
        if reply.status == 200:
            return to_store_verification(reply.body)
        if 400 <= reply.status < 500:
            return refused(reply.detail or NOT_VERIFIED)
        raise self.backend.unexpected("store verification", reply)

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        if self.settings.id_token_mode:
            return TransactionPage(transactions=[], total_count=0, has_more=False)
        reply = await self.backend.transactions(identity, limit, offset)
        if reply.status == 404:  # a backend from before the listing existed (Nov 2025): no history
            return TransactionPage(transactions=[], total_count=0, has_more=False)
        if reply.status != 200:
            raise self.backend.unexpected("transactions", reply)
        body = dict(reply.body)
        items = body.get("transactions")
        if isinstance(items, list):
            body["transactions"] = [public_transaction(item) for item in items]
        try:
            return TransactionPage.model_validate(body)
        except ValidationError:
            logger.error("Billing backend transactions answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed transactions") from None
