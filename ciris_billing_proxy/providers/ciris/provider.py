"""The `ciris` provider: paid credits through the CIRIS Billing backend (`BILLING_BACKEND.md`).

Calls it makes, each as the contract describes:
  POST /v1/billing/credits/check        credit status (and account creation) for one identity
  POST /v1/billing/charges              one use per gated interaction (`amount_minor: 1`, USD)
  POST /v1/billing/credits              a `refund` credit when a gated interaction failed
  POST /v1/billing/purchases            start a Stripe purchase (never retried blindly)
  GET  /v1/billing/purchases/{id}/status     Stripe's status of a payment this agent started
  GET  /v1/billing/transactions         to find the webhook's credit for a payment, when needed
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import quote

from cachetools import LRUCache, TTLCache
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ...errors import InsufficientCredit, InvalidRequest, PaymentNotFound, ProviderUnavailable
from ...identity import Identity
from ...models import CreditStatus, PaymentState, PurchaseInitiated, PurchaseOptions, PurchaseStatus
from ...store import Payment, PaymentStore
from ..base import CreditProvider, ProviderContext
from .settings import CirisSettings
from .transport import BackendUnavailable, Reply, Transport

logger = logging.getLogger("ciris_billing_proxy.ciris")

PAYMENTS_FILE: Final = "ciris-payments.sqlite3"
EMAIL_REQUIRED: Final = "Email address required for purchase"
INVALID_PURCHASE: Final = "Invalid purchase request"
NO_CREDIT: Final = "No free uses or credits remaining"
PASS_THROUGH: Final[frozenset[str]] = frozenset(PaymentState.__args__)  # type: ignore[attr-defined]


class BackendCredit(BaseModel):
    """`CreditCheckResponse`. Integers were nullable before 2025-12; null is read as 0."""

    model_config = ConfigDict(extra="ignore")

    has_credit: bool
    credits_remaining: int = 0
    plan_name: str | None = None
    reason: str | None = None
    free_uses_remaining: int = 0
    total_uses: int = 0
    purchase_required: bool = False
    purchase_price_minor: int = 0
    purchase_uses: int = 0
    daily_free_uses_remaining: int = 0
    daily_free_uses_limit: int = 0

    @field_validator(
        "credits_remaining",
        "free_uses_remaining",
        "total_uses",
        "purchase_price_minor",
        "purchase_uses",
        "daily_free_uses_remaining",
        "daily_free_uses_limit",
        mode="before",
    )
    @classmethod
    def _null_is_zero(cls, value: Any) -> Any:
        return 0 if value is None else value


class BackendPurchase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    payment_id: str
    client_secret: str = ""
    amount_minor: int
    currency: str = "USD"
    uses_purchased: int
    status: str = "requires_payment_method"
    publishable_key: str | None = None


def to_credit_status(backend: BackendCredit) -> CreditStatus:
    """Map the backend's check onto the UI contract, keeping its consistency rules.

    Daily free uses are counted into `free_uses_remaining`; when the backend says there is no credit
    (including suspended or closed accounts, which may still hold uses) both counts are 0.
    """
    free = max(backend.free_uses_remaining, 0) + max(backend.daily_free_uses_remaining, 0)
    paid = max(backend.credits_remaining, 0)
    has_credit = backend.has_credit and free + paid > 0
    options = None
    if backend.purchase_required:
        if backend.purchase_uses <= 0 or backend.purchase_price_minor < 0:
            raise ProviderUnavailable("purchase required but the backend gave no price")
        options = PurchaseOptions(
            price_minor=backend.purchase_price_minor, uses=backend.purchase_uses, currency="USD"
        )
    return CreditStatus(
        has_credit=has_credit,
        credits_remaining=paid if has_credit else 0,
        free_uses_remaining=free if has_credit else 0,
        total_uses=max(backend.total_uses, 0),
        plan_name=backend.plan_name or "free",
        purchase_required=backend.purchase_required and not has_credit,
        purchase_options=options if not has_credit else None,
        reason=backend.reason if not has_credit else None,
        daily_free_uses_remaining=max(backend.daily_free_uses_remaining, 0),
        daily_free_uses_limit=max(backend.daily_free_uses_limit, 0),
    )


class CirisProvider(CreditProvider):
    name = "ciris"

    def __init__(self, settings: CirisSettings, *, database: str | Path, agent_id: str = "agent") -> None:
        self.settings = settings
        self.agent_id = agent_id
        self.transport = Transport(settings)
        self.payments = PaymentStore(database)
        # Users whose backend account is known to exist, so a charge need not be preceded by a check.
        self._known: LRUCache[tuple[str, str], bool] = LRUCache(maxsize=100_000)
        # Request keys whose charge this process saw succeed: their refund needs no lookup first.
        self._charged: LRUCache[tuple[tuple[str, str], str], bool] = LRUCache(maxsize=100_000)
        # Purchase replies kept in memory only (they carry the Stripe client secret): by
        # (user, Idempotency-Key) for a day, and by user for the double-click window.
        self._by_key: TTLCache[tuple[tuple[str, str], str], PurchaseInitiated] = TTLCache(
            maxsize=10_000, ttl=86_400
        )
        self._recent: TTLCache[tuple[str, str], PurchaseInitiated] = TTLCache(
            maxsize=10_000, ttl=max(settings.purchase_reuse_seconds, 1e-9)
        )
        self._initiating: dict[tuple[tuple[str, str], str], asyncio.Task[PurchaseInitiated]] = {}
        self._warned_no_publishable_key = False

    @classmethod
    def from_context(cls, context: ProviderContext) -> Self:
        settings = CirisSettings.load(context.options, context.environ)
        return cls(
            settings,
            database=settings.database or context.data_dir / PAYMENTS_FILE,
            agent_id=context.agent_id,
        )

    @property
    def purchases_enabled(self) -> bool:
        return True

    async def start(self) -> None:
        await self.payments.open()
        await self.transport.start()

    async def stop(self) -> None:
        for task in list(self._initiating.values()):
            task.cancel()
        await self.transport.stop()
        await self.payments.close()

    # -- identity -------------------------------------------------------------------------------
    def _who(self, identity: Identity) -> dict[str, Any]:
        """The one canonical backend identity of a user (plus metadata the backend stores)."""
        body: dict[str, Any] = {
            "oauth_provider": f"oauth:{identity.namespace}",
            "external_id": identity.user_id,
            "agent_id": self.agent_id,
        }
        if identity.email:
            body["customer_email"] = identity.email
        return body

    def _key(self, kind: str, identity: Identity, request_key: str) -> str:
        # Backend keys are global across users and agents: namespace them, deterministically.
        parts = (identity.namespace, identity.user_id, request_key)
        digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]
        return f"{self.agent_id}-{kind}-{digest}"

    async def _call(self, method: str, path: str, **kwargs: Any) -> Reply:
        try:
            return await self.transport.call(method, path, **kwargs)
        except BackendUnavailable as exc:
            raise ProviderUnavailable(exc.reason) from None

    def _unexpected(self, endpoint: str, reply: Reply) -> ProviderUnavailable:
        logger.error("Billing backend %s answered HTTP %d unexpectedly", endpoint, reply.status)
        return ProviderUnavailable(f"unexpected HTTP {reply.status} from {endpoint}")

    # -- credit ---------------------------------------------------------------------------------
    async def _check(self, identity: Identity) -> BackendCredit:
        reply = await self._call(
            "POST",
            "/v1/billing/credits/check",
            endpoint="credits/check",
            idempotent=True,
            json_body={**self._who(identity), "context": {"agent_id": self.agent_id}},
        )
        if reply.status != 200:
            raise self._unexpected("credits/check", reply)
        try:
            credit = BackendCredit.model_validate(reply.body)
        except ValidationError:
            logger.error("Billing backend credits/check answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed credit check") from None
        self._known[identity.key] = True
        return credit

    async def credit_status(self, identity: Identity) -> CreditStatus:
        return to_credit_status(await self._check(identity))

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        if identity.key not in self._known:
            await self._check(identity)  # charges never create accounts; checks do
        reply = await self._charge(identity, idempotency_key)
        if reply.status == 404:  # the account vanished or this process's memory was wrong
            await self._check(identity)
            reply = await self._charge(identity, idempotency_key)
        if reply.status in (201, 409):  # 409 + X-Existing-Charge-ID: this request was already charged
            self._charged[(identity.key, idempotency_key)] = True
            return
        if reply.status == 402:
            raise InsufficientCredit(NO_CREDIT)
        if reply.status == 403 and reply.detail.startswith("Account"):
            raise InsufficientCredit("Account closed" if "closed" in reply.detail else "Account suspended")
        raise self._unexpected("charges", reply)

    async def _charge(self, identity: Identity, request_key: str) -> Reply:
        return await self._call(
            "POST",
            "/v1/billing/charges",
            endpoint="charges",
            idempotent=True,  # the deterministic idempotency key makes a retry safe
            json_body={
                **self._who(identity),
                "amount_minor": 1,
                "currency": "USD",
                "description": "Agent interaction",
                "idempotency_key": self._key("charge", identity, request_key),
                "metadata": {"agent_id": self.agent_id, "request_id": request_key},
            },
        )

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        # A refund is a credit the backend adds unconditionally, so refunding a charge that never
        # happened would mint one. Refund only a charge known to exist: seen here, or listed by the
        # backend with this request's id.
        if (identity.key, idempotency_key) not in self._charged and not await self._find_transaction(
            identity, "charge", lambda t: (t.get("metadata") or {}).get("request_id") == idempotency_key
        ):
            return
        reply = await self._call(
            "POST",
            "/v1/billing/credits",
            endpoint="credits",
            idempotent=True,
            json_body={
                **self._who(identity),
                "amount_minor": 1,
                "currency": "USD",
                "description": "Refund: agent interaction failed",
                "transaction_type": "refund",
                "idempotency_key": self._key("refund", identity, idempotency_key),
            },
        )
        if reply.status not in (201, 409):
            raise self._unexpected("credits", reply)
        self._charged.pop((identity.key, idempotency_key), None)

    # -- purchases ------------------------------------------------------------------------------
    async def initiate_purchase(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None
    ) -> PurchaseInitiated:
        if not identity.email:
            raise InvalidRequest(EMAIL_REQUIRED)
        if idempotency_key is not None:
            replay = self._by_key.get((identity.key, idempotency_key))
            if replay is not None:
                return replay
        else:
            recent = self._recent.get(identity.key)
            if recent is not None:
                return recent
        # Concurrent initiates of one user (same key, or both without one) share one backend call.
        slot = (identity.key, idempotency_key or "")
        task = self._initiating.get(slot)
        if task is None:
            task = asyncio.ensure_future(self._purchase(identity, return_url))
            self._initiating[slot] = task
            task.add_done_callback(lambda _: self._initiating.pop(slot, None))
        purchase = await asyncio.shield(task)
        if idempotency_key is not None:
            self._by_key[(identity.key, idempotency_key)] = purchase
        self._recent[identity.key] = purchase
        return purchase

    async def _purchase(self, identity: Identity, return_url: str | None) -> PurchaseInitiated:
        # A fresh check first: it creates the account the right way (10 free uses; a purchase would
        # create it with 3) and gives the paid balance against which the webhook's credits are seen.
        before = await self._check(identity)
        body = self._who(identity)
        if return_url:
            body["return_url"] = return_url
        reply = await self._call(
            "POST",
            "/v1/billing/purchases",
            endpoint="purchases",
            idempotent=False,
            json_body=body,
            budget=self.settings.purchase_timeout_seconds,
        )
        if reply.status in (400, 422):
            raise InvalidRequest(INVALID_PURCHASE)
        if reply.status != 201:
            raise self._unexpected("purchases", reply)
        try:
            bought = BackendPurchase.model_validate(reply.body)
        except ValidationError:
            logger.error("Billing backend purchases answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed purchase") from None
        await self.payments.record(
            bought.payment_id,
            identity,
            uses=bought.uses_purchased,
            amount_minor=bought.amount_minor,
            currency=bought.currency,
            balance_before=max(before.credits_remaining, 0),
        )
        return PurchaseInitiated(
            payment_id=bought.payment_id,
            client_secret=bought.client_secret,
            amount_minor=bought.amount_minor,
            currency=bought.currency,
            uses_purchased=bought.uses_purchased,
            publishable_key=bought.publishable_key or self._fallback_publishable_key(),
        )

    def _fallback_publishable_key(self) -> str:
        key = self.settings.stripe_publishable_key
        if not key and not self._warned_no_publishable_key:
            self._warned_no_publishable_key = True
            logger.warning("No Stripe publishable key from the backend or STRIPE_PUBLISHABLE_KEY")
        return key or ""

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        payment = await self.payments.get(payment_id)
        if payment is None or not payment.owned_by(identity):
            raise PaymentNotFound
        if payment.credited:
            assert payment.balance_after is not None
            return PurchaseStatus(
                status="succeeded", credits_added=payment.uses, balance_after=payment.balance_after
            )
        reply = await self._call(
            "GET",
            f"/v1/billing/purchases/{quote(payment_id, safe='')}/status",
            endpoint="purchase_status",
            idempotent=True,
        )
        if reply.status != 200:
            # We created this payment, so a 404 here is the backend's Stripe error, not a bad id.
            raise self._unexpected("purchase_status", reply)
        stripe_status = reply.body.get("status")
        if stripe_status != "succeeded":
            state = stripe_status if stripe_status in PASS_THROUGH else "unknown"
            return PurchaseStatus.model_validate({"status": state})
        return await self._settle(identity, payment)

    async def _settle(self, identity: Identity, payment: Payment) -> PurchaseStatus:
        """Stripe says succeeded; answer succeeded only once the webhook's credits show."""
        now = await self._check(identity)
        landed = now.credits_remaining >= payment.balance_before + payment.uses
        if not landed:
            landed = await self._find_transaction(
                identity, "credit", lambda t: t.get("external_transaction_id") == payment.payment_id
            )
        if landed:
            balance = await self.payments.mark_credited(payment.payment_id, max(now.credits_remaining, 0))
            return PurchaseStatus(status="succeeded", credits_added=payment.uses, balance_after=balance)
        first_seen = await self.payments.seen_succeeded(payment.payment_id)
        if time.time() - first_seen > self.settings.credit_wait_seconds:
            logger.error(
                "Payment %s succeeded at Stripe but its credits have not landed after %.0f s",
                payment.payment_id,
                self.settings.credit_wait_seconds,
            )
            return PurchaseStatus(status="unknown")
        return PurchaseStatus(status="processing")

    async def _find_transaction(
        self, identity: Identity, kind: str, match: Callable[[dict[str, Any]], bool]
    ) -> bool:
        """Is one of the user's 50 newest transactions of this kind a match? Exact where balances
        are not: the webhook's credit names the payment, a charge names the request."""
        who = self._who(identity)
        reply = await self._call(
            "GET",
            "/v1/billing/transactions",
            endpoint="transactions",
            idempotent=True,
            params={
                "oauth_provider": who["oauth_provider"],
                "external_id": who["external_id"],
                "limit": "50",
                "offset": "0",
            },
        )
        if reply.status != 200:
            raise self._unexpected("transactions", reply)
        items = reply.body.get("transactions")
        return isinstance(items, list) and any(
            isinstance(t, dict) and t.get("type") == kind and match(t) for t in items
        )
