"""The `ciris` provider: paid credits through the CIRIS Billing backend (`docs/billing-backend.md`).

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
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import quote

from cachetools import LRUCache, TTLCache
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ...errors import InsufficientCredit, InvalidRequest, PaymentNotFound, ProviderUnavailable
from ...identity import Identity
from ...models import (
    PAYMENT_STATES,
    CreditStatus,
    PurchaseInitiated,
    PurchaseOptions,
    PurchaseStatus,
    TransactionPage,
)
from ...store import Payment, PaymentStore
from ..base import CreditProvider, ProviderContext
from .charges import ChargeRecord, ListedCharge, ListingUnusable, find_charge
from .settings import CirisSettings
from .transport import BackendUnavailable, Reply, Transport

logger = logging.getLogger("ciris_billing_proxy.ciris")

PAYMENTS_FILE: Final = "ciris-payments.sqlite3"
EMAIL_REQUIRED: Final = "Email address required for purchase"
INVALID_PURCHASE: Final = "Invalid purchase request"
NO_CREDIT: Final = "No free uses or credits remaining"
LOCAL_NAMESPACE: Final = "local"
BLOCKED: Final = frozenset({"Account suspended", "Account closed"})
#: Stripe states of a PaymentIntent the user can still pay.
AWAITING_PAYMENT: Final = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})


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


_OWN_CHARGE = re.compile(r"^(Agent interaction) [0-9a-f]{32}$")


def _public(item: Any) -> Any:
    """A backend transaction as the user sees it: without the request key this proxy puts in its
    charges' descriptions (to find them after a timeout)."""
    if isinstance(item, dict) and isinstance(item.get("description"), str):
        return {**item, "description": _OWN_CHARGE.sub(r"\1", item["description"])}
    return item


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


class _NotRefundable(Exception):
    """The backend gave an answer about a refund that retrying cannot change."""


class CirisProvider(CreditProvider):
    name = "ciris"

    def __init__(self, settings: CirisSettings, *, database: str | Path, agent_id: str = "agent") -> None:
        self.settings = settings
        self.agent_id = agent_id
        self.transport = Transport(settings)
        self.payments = PaymentStore(database)
        # The charges this process made, by request, until given back or forgotten (LRU).
        self._charged: LRUCache[tuple[tuple[str, str], str], ChargeRecord] = LRUCache(maxsize=100_000)
        self._owed: dict[tuple[tuple[str, str], str], ChargeRecord] = {}
        self._listing_missing = False
        # Purchase replies kept in memory only (they carry the Stripe client secret): by
        # (user, Idempotency-Key) for a day, and by user for the double-click window.
        self._by_key: TTLCache[tuple[tuple[str, str], str], PurchaseInitiated] = TTLCache(
            maxsize=10_000, ttl=86_400
        )
        self._recent: TTLCache[tuple[str, str], PurchaseInitiated] = TTLCache(
            maxsize=10_000, ttl=max(settings.purchase_reuse_seconds, 1e-9)
        )
        self._initiating: dict[tuple[tuple[str, str], str], asyncio.Task[PurchaseInitiated]] = {}

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
        """The one canonical backend identity of a user (plus metadata the backend stores).

        Federated namespaces (`google`, `apple`, ...) name the same person on every agent, so they
        go as they are. The agent's own users (namespace `local`) are only unique within this agent,
        and the backend is shared by many agents: their `external_id` carries the agent's id, so
        "admin" on two agents is two accounts.
        """
        external_id = identity.user_id
        if identity.namespace == LOCAL_NAMESPACE:
            external_id = f"{self.agent_id}:{identity.user_id}"
            if len(external_id) > 255:
                external_id = (
                    f"{self.agent_id}:sha256:{hashlib.sha256(identity.user_id.encode()).hexdigest()}"
                )
        body: dict[str, Any] = {
            "oauth_provider": f"oauth:{identity.namespace}",
            "external_id": external_id,
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

    def _deadline(self, seconds: float) -> float:
        """One budget for a whole operation: every call it makes shares what is left of it."""
        return asyncio.get_running_loop().time() + seconds

    async def _call(self, method: str, path: str, **kwargs: Any) -> Reply:
        try:
            return await self.transport.call(method, path, **kwargs)
        except BackendUnavailable as exc:
            raise ProviderUnavailable(exc.reason, maybe_applied=exc.maybe_applied) from None

    def _unexpected(self, endpoint: str, reply: Reply) -> ProviderUnavailable:
        logger.error("Billing backend %s answered HTTP %d unexpectedly", endpoint, reply.status)
        # A definite answer (not a timeout): whatever it was, the backend did not apply the call.
        return ProviderUnavailable(f"unexpected HTTP {reply.status} from {endpoint}", maybe_applied=False)

    # -- credit ---------------------------------------------------------------------------------
    async def _check(self, identity: Identity, deadline: float | None = None) -> BackendCredit:
        reply = await self._call(
            "POST",
            "/v1/billing/credits/check",
            endpoint="credits/check",
            idempotent=True,
            json_body={**self._who(identity), "context": {"agent_id": self.agent_id}},
            deadline=deadline,
        )
        if reply.status != 200:
            raise self._unexpected("credits/check", reply)
        try:
            return BackendCredit.model_validate(reply.body)
        except ValidationError:
            logger.error("Billing backend credits/check answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed credit check") from None

    async def credit_status(self, identity: Identity) -> CreditStatus:
        return to_credit_status(await self._check(identity))

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        deadline = self._deadline(self.settings.timeout_seconds)
        # Check first: it creates unknown accounts (charges never do) and refuses early when there
        # is no credit. Which pool the charge then takes is not judged from this balance: only the
        # listing can tell that exactly (see `give_back`).
        before = await self._check(identity, deadline)
        if not before.has_credit:
            raise InsufficientCredit(before.reason or NO_CREDIT)
        slot = (identity.key, idempotency_key)
        record = self._charged[slot] = ChargeRecord(sent_at=time.monotonic())
        reply = await self._charge(identity, idempotency_key, deadline)
        if reply.status == 404:  # the account vanished between the check and the charge
            await self._check(identity, deadline)
            reply = await self._charge(identity, idempotency_key, deadline)
        if reply.status == 201:
            charge_id = reply.body.get("charge_id")
            record.charge_id = charge_id if isinstance(charge_id, str) and charge_id else None
            return
        if reply.status == 409:  # this request was charged by an earlier attempt
            record.charge_id = reply.headers.get("x-existing-charge-id") or None
            return
        self._charged.pop(slot, None)
        if reply.status == 402:
            raise InsufficientCredit(NO_CREDIT)
        if reply.status == 403 and reply.detail.startswith("Account"):
            raise InsufficientCredit("Account closed" if "closed" in reply.detail else "Account suspended")
        raise self._unexpected("charges", reply)

    async def _charge(self, identity: Identity, request_key: str, deadline: float) -> Reply:
        return await self._call(
            "POST",
            "/v1/billing/charges",
            endpoint="charges",
            idempotent=True,  # the deterministic idempotency key makes a retry safe
            json_body={
                **self._who(identity),
                "amount_minor": 1,
                "currency": "USD",
                # The request key in the description too: transaction listings always carry the
                # description, while their metadata is optional.
                "description": f"Agent interaction {request_key}",
                "idempotency_key": self._key("charge", identity, request_key),
                "metadata": {"agent_id": self.agent_id, "request_id": request_key},
            },
            deadline=deadline,
        )

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        """Refund the paid credit taken by this request's charge, if it took one.

        A refund is a paid credit the backend adds unconditionally, so two things must never be
        refunded: a charge that did not happen (that would mint a credit) and a charge that used a
        free use (that would turn a free use into a paid credit that never expires). A free use
        taken by a failed interaction is therefore not given back: the backend has no way to.

        Which pool the charge took is read from the backend's listing (`charges.find_charge`),
        exact under any interleaving of charges and refunds. When that cannot be known yet (the
        backend is down, or a charge whose reply was lost has not shown up), this raises
        `ProviderUnavailable` and the service retries; the refund's idempotency key makes every
        retry safe. An answer that retrying cannot change (the backend refuses the listing or the
        refund outright) ends it with a WARNING naming the request key, for an operator.
        """
        slot = (identity.key, idempotency_key)
        # Owed from now until done: kept out of the LRU, so no amount of newer spends evicts it.
        record = self._owed.get(slot) or self._charged.pop(slot, None)
        if record is None:
            return  # not charged by this process (or forgotten after a restart): nothing known to return
        self._owed[slot] = record
        try:
            charge = await self._listed_charge(identity, idempotency_key, record)
            if charge is None:
                if time.monotonic() - record.sent_at < self.settings.reconcile_window_seconds:
                    # The backend finishes requests whose client went away: it may still land.
                    raise ProviderUnavailable("the charge is not listed yet")
                if record.charge_id is None:
                    logger.info(
                        "The charge for request key %s never landed; nothing to refund", idempotency_key
                    )
                else:
                    logger.warning(
                        "The charge for request key %s is not listed; not refunded", idempotency_key
                    )
            elif charge.paid and await self._may_have_taken_paid(identity):
                await self._refund(identity, idempotency_key)
        except _NotRefundable as exc:
            logger.warning("Not refunding the charge for request key %s: %s", idempotency_key, exc)
        self._owed.pop(slot, None)

    async def _may_have_taken_paid(self, identity: Identity) -> bool:
        """A guard on the listing's verdict. One-time free uses are taken before paid credits and
        never come back, so while any remain, no charge of this user has taken a paid credit. The
        listing alone would be misled by a paid-balance change it does not show (the backend's
        `/v1/tools/charge` takes main-pool credits without a listed entry)."""
        return (await self._check(identity)).free_uses_remaining <= 0

    async def _listed_charge(
        self, identity: Identity, request_key: str, record: ChargeRecord
    ) -> ListedCharge | None:
        charge_id = record.charge_id

        def matches(item: dict[str, Any]) -> bool:
            if charge_id is not None:
                return item.get("transaction_id") == charge_id
            return (item.get("metadata") or {}).get("request_id") == request_key or str(
                item.get("description", "")
            ).endswith(request_key)

        async def fetch(limit: int, offset: int) -> dict[str, Any]:
            reply = await self._list(identity, limit, offset)
            if reply.status != 200:
                # Also a backend from before the listing existed (404): without it no refund can
                # be proven safe, so none is made.
                raise _NotRefundable(f"the transactions listing answered HTTP {reply.status}")
            body: dict[str, Any] = reply.body
            return body

        try:
            return await find_charge(fetch, matches)
        except ListingUnusable as exc:
            raise _NotRefundable(f"the transactions listing does not fit the contract ({exc})") from None

    async def _refund(self, identity: Identity, request_key: str) -> None:
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
                "idempotency_key": self._key("refund", identity, request_key),
            },
        )
        if reply.status not in (201, 409):  # 409: this refund was made by an earlier attempt
            raise _NotRefundable(f"the refund was refused with HTTP {reply.status}")

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
            if recent is not None and await self._awaits_payment(identity, recent.payment_id):
                return recent
        # Concurrent initiates of one user (same key, or both without one) share one backend call.
        slot = (identity.key, idempotency_key or "")
        task = self._initiating.get(slot)
        if task is None:
            task = asyncio.ensure_future(self._purchase(identity, return_url, idempotency_key))
            self._initiating[slot] = task
            task.add_done_callback(lambda _: self._initiating.pop(slot, None))
        return await asyncio.shield(task)

    async def _awaits_payment(self, identity: Identity, payment_id: str) -> bool:
        """Whether a payment can still be handed back for a double click: only one still waiting
        for the user to pay. One that succeeded, failed or was canceled cannot be paid again, so
        the next click must get a new one; when its state cannot be read, so must it."""
        payment = await self.payments.get(payment_id)
        if payment is not None and not payment.credited:
            try:
                reply = await self._stripe_status(payment_id, self._deadline(self.settings.timeout_seconds))
            except ProviderUnavailable:
                reply = None
            if reply is not None and reply.status == 200 and reply.body.get("status") in AWAITING_PAYMENT:
                return True
        self._forget_recent(identity, payment_id)
        return False

    def _forget_recent(self, identity: Identity, payment_id: str) -> None:
        recent = self._recent.get(identity.key)
        if recent is not None and recent.payment_id == payment_id:
            self._recent.pop(identity.key, None)

    async def _stripe_status(self, payment_id: str, deadline: float) -> Reply:
        return await self._call(
            "GET",
            f"/v1/billing/purchases/{quote(payment_id, safe='')}/status",
            endpoint="purchase_status",
            idempotent=True,
            deadline=deadline,
        )

    async def _new_payment_intent(self, body: dict[str, Any], deadline: float) -> BackendPurchase:
        reply = await self._call(
            "POST",
            "/v1/billing/purchases",
            endpoint="purchases",
            idempotent=False,
            json_body=body,
            deadline=deadline,
        )
        if reply.status == 400:
            raise InvalidRequest(INVALID_PURCHASE)
        if reply.status != 201:
            raise self._unexpected("purchases", reply)  # a 422 means this proxy sent a bad body
        try:
            return BackendPurchase.model_validate(reply.body)
        except ValidationError:
            logger.error("Billing backend purchases answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed purchase") from None

    async def _replayed(self, bought: BackendPurchase) -> bool:
        """Whether the backend handed back a PaymentIntent it had made before. Stripe replays the
        creation reply (status included) for a repeated idempotency key, so a payment this proxy
        already recorded is the surest sign; a status that cannot be paid is another."""
        return bought.status not in AWAITING_PAYMENT or await self.payments.get(bought.payment_id) is not None

    async def _purchase(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None
    ) -> PurchaseInitiated:
        deadline = self._deadline(self.settings.purchase_timeout_seconds)
        # A fresh check first: it creates the account the right way (10 free uses; a purchase would
        # create it with 3), refuses suspended or closed accounts (the backend would sell to them),
        # and gives the paid balance against which the webhook's credits are seen.
        before = await self._check(identity, deadline)
        if before.reason in BLOCKED:
            raise InvalidRequest(f"{before.reason}: purchases are not possible")
        publishable_fallback = self.settings.stripe_publishable_key
        body = self._who(identity)
        if return_url:
            body["return_url"] = return_url
        bought = await self._new_payment_intent(body, deadline)
        if await self._replayed(bought):
            # The backend's Stripe idempotency key is `purchase-v3-{account}-{unix second}`: a
            # purchase in the same second as the last one gets that PaymentIntent back, even when
            # it has already been paid. A call a whole second after that reply is in a later second
            # of the backend's clock, whatever its skew from ours, so it makes a new one.
            await asyncio.sleep(1.0)
            bought = await self._new_payment_intent(body, deadline)
            if await self._replayed(bought):
                logger.error("Billing backend purchases answered a PaymentIntent that cannot be paid")
                raise ProviderUnavailable("purchase replayed an ended payment", maybe_applied=False)
        publishable_key = bought.publishable_key or publishable_fallback
        if not publishable_key:
            logger.error(
                "No Stripe publishable key: the backend sent none and STRIPE_PUBLISHABLE_KEY is unset"
            )
            raise ProviderUnavailable("no publishable key", maybe_applied=False)
        await self.payments.record(
            bought.payment_id,
            identity,
            uses=bought.uses_purchased,
            amount_minor=bought.amount_minor,
            currency=bought.currency,
            balance_before=max(before.credits_remaining, 0),
        )
        purchase = PurchaseInitiated(
            payment_id=bought.payment_id,
            client_secret=bought.client_secret,
            amount_minor=bought.amount_minor,
            currency=bought.currency,
            uses_purchased=bought.uses_purchased,
            publishable_key=publishable_key,
        )
        # Remembered before the in-flight slot is released, so no click can fall between the two.
        if idempotency_key is not None:
            self._by_key[(identity.key, idempotency_key)] = purchase
        self._recent[identity.key] = purchase
        return purchase

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        payment = await self.payments.get(payment_id)
        if payment is None or not payment.owned_by(identity):
            raise PaymentNotFound
        if payment.credited:
            assert payment.balance_after is not None
            return PurchaseStatus(
                status="succeeded", credits_added=payment.uses, balance_after=payment.balance_after
            )
        # The status call reaches Stripe synchronously: it gets the purchase budget, shared with
        # the checks that may follow it.
        deadline = self._deadline(self.settings.purchase_timeout_seconds)
        reply = await self._stripe_status(payment_id, deadline)
        if reply.status != 200:
            # We created this payment, so a 404 here is the backend's Stripe error, not a bad id.
            raise self._unexpected("purchase_status", reply)
        stripe_status = reply.body.get("status")
        if stripe_status not in AWAITING_PAYMENT:
            self._forget_recent(identity, payment_id)
        if stripe_status != "succeeded":
            state = stripe_status if stripe_status in PAYMENT_STATES else "unknown"
            return PurchaseStatus.model_validate({"status": state})
        return await self._settle(identity, payment, deadline)

    async def _settle(self, identity: Identity, payment: Payment, deadline: float) -> PurchaseStatus:
        """Stripe says succeeded; answer succeeded only once *this payment's* credits show.

        The webhook's credit names the payment (`external_transaction_id`), which is exact even
        when other credits arrive or the user spends meanwhile. Only a backend without the
        transactions listing falls back to the balance having grown by the uses bought."""
        credited = await self._find_transaction(
            identity,
            "credit",
            lambda t: t.get("external_transaction_id") == payment.payment_id,
            deadline=deadline,
            missing_ok=True,
        )
        now = await self._check(identity, deadline)
        landed = credited is not None or (
            self._listing_missing and now.credits_remaining >= payment.balance_before + payment.uses
        )
        if landed:
            shown = to_credit_status(now).credits_remaining  # what /credits shows from now on
            balance = await self.payments.mark_credited(payment.payment_id, shown)
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

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        reply = await self._list(identity, limit, offset)
        if reply.status == 404:  # a backend from before the listing existed (Nov 2025): no history
            self._listing_missing = True
            return TransactionPage(transactions=[], total_count=0, has_more=False)
        if reply.status != 200:
            raise self._unexpected("transactions", reply)
        body = dict(reply.body)
        items = body.get("transactions")
        if isinstance(items, list):
            body["transactions"] = [_public(item) for item in items]
        try:
            return TransactionPage.model_validate(body)
        except ValidationError:
            logger.error("Billing backend transactions answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed transactions") from None

    async def _list(
        self, identity: Identity, limit: int, offset: int, deadline: float | None = None
    ) -> Reply:
        who = self._who(identity)
        return await self._call(
            "GET",
            "/v1/billing/transactions",
            endpoint="transactions",
            idempotent=True,
            params={
                "oauth_provider": who["oauth_provider"],
                "external_id": who["external_id"],
                "limit": str(limit),
                "offset": str(offset),
            },
            deadline=deadline,
        )

    async def _find_transaction(
        self,
        identity: Identity,
        kind: str,
        match: Callable[[dict[str, Any]], bool],
        *,
        deadline: float | None = None,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        """The first of the user's 100 newest transactions of this kind that matches, if any."""
        reply = await self._list(identity, 100, 0, deadline)
        if reply.status == 404 and missing_ok:
            self._listing_missing = True  # a backend from before the listing existed (Nov 2025)
            return None
        if reply.status != 200:
            raise self._unexpected("transactions", reply)
        items = reply.body.get("transactions")
        if not isinstance(items, list):
            return None
        for item in items:
            if isinstance(item, dict) and item.get("type") == kind and match(item):
                return item
        return None
