"""The fake backend's state and rules, free of HTTP: accounts, charges, credits, PaymentIntents.

Each rule follows `docs/billing-backend.md` section 3, quirks included; the section is named beside it.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _next_midnight(now: datetime) -> datetime:
    return (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)


class BackendError(Exception):
    """An error reply: status, JSON detail, extra headers."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclass
class Account:
    account_id: str
    oauth_provider: str
    external_id: str
    free_uses_remaining: int
    daily_free_uses_remaining: int
    daily_free_uses_limit: int
    daily_reset_at: datetime
    paid_credits: int = 0
    balance_minor: int = 0  # legacy; kept equal to paid_credits by charges and credits
    total_uses: int = 0
    plan_name: str = "free"
    status: str = "active"
    currency: str = "USD"
    customer_email: str | None = None
    display_name: str | None = None
    wa_id: str | None = None
    tenant_id: str | None = None
    created_at: str = field(default_factory=_now_iso)


@dataclass
class LedgerEntry:
    transaction_id: str
    account_key: tuple[str, str]
    type: str  # "charge" | "credit"
    amount_minor: int
    currency: str
    description: str
    created_at: str
    balance_after: int
    idempotency_key: str | None
    transaction_type: str | None = None
    external_transaction_id: str | None = None
    metadata: dict[str, Any] | None = None
    #: Which pool a charge took ("daily", "free" or "paid"): the truth tests check the proxy's
    #: bookkeeping against. The real backend does not expose it, so neither does the HTTP API.
    pool: str | None = None


@dataclass
class PaymentIntent:
    payment_id: str
    client_secret: str
    account_key: tuple[str, str]
    amount_minor: int
    status: str = "requires_payment_method"
    credited: bool = False


@dataclass
class Pricing:
    free_uses_per_account: int = 10
    free_uses_purchase_created: int = 3
    daily_free_uses_limit: int = 2
    price_per_purchase_minor: int = 500
    paid_uses_per_purchase: int = 20
    publishable_key: str = "pk_test_fake_backend"
    stripe_configured: bool = True


#: Credits per store product (sections 3.9 and 7, packs as of 2026-02-18): the product ids each store sells.
GOOGLE_PLAY_PRODUCTS: Final = {"credits_100": 99, "credits_250": 249, "credits_600": 599}
APP_STORE_PRODUCTS: Final = {
    f"ai.ciris.mobile.credits_{size}_v1": credits
    for size, credits in (("100", 99), ("250", 249), ("600", 599))
}
#: What the fake App Store says a transaction bought when the app names no product (iOS sends none).
APP_STORE_DEFAULT_PRODUCT: Final = "ai.ciris.mobile.credits_100_v1"
#: A store token starting with this is one the store calls not valid (a refunded or cancelled purchase).
INVALID_PURCHASE_PREFIX: Final = "invalid"


class Ledger:
    """All state, behind one lock: the HTTP layer and test controls may run on different threads."""

    def __init__(self, pricing: Pricing | None = None) -> None:
        self.pricing = pricing or Pricing()
        self.lock = threading.RLock()
        self.accounts: dict[tuple[str, str], Account] = {}
        self.transactions: list[LedgerEntry] = []
        self.payments: dict[str, PaymentIntent] = {}
        self._purchase_keys: dict[str, str] = {}
        #: (store, purchase token or transaction id) -> order id: what makes a repeat a no-op.
        self.store_purchases: dict[tuple[str, str], str] = {}
        self.clock_offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.clock_offset

    # -- accounts (section 2, 3.1) -------------------------------------------------------------
    def _create(self, key: tuple[str, str], free_uses: int, body: dict[str, Any]) -> Account:
        now = self.now()
        account = Account(
            account_id=str(uuid.uuid4()),
            oauth_provider=key[0],
            external_id=key[1],
            free_uses_remaining=free_uses,
            daily_free_uses_remaining=self.pricing.daily_free_uses_limit,
            daily_free_uses_limit=self.pricing.daily_free_uses_limit,
            daily_reset_at=_next_midnight(now),
            wa_id=body.get("wa_id"),
            tenant_id=body.get("tenant_id"),
        )
        self.accounts[key] = account
        return account

    def _touch_metadata(self, account: Account, body: dict[str, Any]) -> None:
        # Written on every call, only when not null (section 2).
        for name in ("customer_email", "display_name"):
            if body.get(name) is not None:
                setattr(account, name, body[name])

    def _daily_reset(self, account: Account) -> None:
        now = self.now()
        if now >= account.daily_reset_at:
            account.daily_free_uses_remaining = account.daily_free_uses_limit
            account.daily_reset_at = _next_midnight(now)

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        key = (body["oauth_provider"], body["external_id"])
        with self.lock:
            account = self.accounts.get(key) or self._create(key, self.pricing.free_uses_per_account, body)
            self._touch_metadata(account, body)
            self._daily_reset(account)
            return self.credit_view(account)

    def credit_view(self, account: Account) -> dict[str, Any]:
        active = account.status == "active"
        has_credit = active and (
            account.daily_free_uses_remaining > 0
            or account.free_uses_remaining > 0
            or account.paid_credits > 0
        )
        purchase_required = active and not has_credit
        reason = None
        if account.status == "suspended":
            reason = "Account suspended"
        elif account.status == "closed":
            reason = "Account closed"
        elif not has_credit:
            reason = "No free uses or credits remaining"
        return {
            "has_credit": has_credit,
            "credits_remaining": account.paid_credits,
            "plan_name": account.plan_name,
            "reason": reason,
            "free_uses_remaining": account.free_uses_remaining,
            "total_uses": account.total_uses,
            "purchase_required": purchase_required,
            "purchase_price_minor": self.pricing.price_per_purchase_minor if purchase_required else 0,
            "purchase_uses": self.pricing.paid_uses_per_purchase if purchase_required else 0,
            "daily_free_uses_remaining": account.daily_free_uses_remaining if active else 0,
            "daily_free_uses_limit": account.daily_free_uses_limit,
        }

    def upsert_account(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/billing/accounts (3.4): an existing account comes back unchanged; a new one gets
        the ORM default of 3 free uses, and `initial_balance_minor` goes to the legacy balance only."""
        key = (body["oauth_provider"], body["external_id"])
        with self.lock:
            if key not in self.accounts:
                account = self._create(key, self.pricing.free_uses_purchase_created, body)
                account.plan_name = body["plan_name"]
                account.balance_minor = body["initial_balance_minor"]
                self._touch_metadata(account, body)
            return self.account_view(key)

    def account_view(self, key: tuple[str, str]) -> dict[str, Any]:
        with self.lock:
            account = self.accounts.get(key)
            if account is None:
                raise BackendError(404, "Account not found")
            return {
                "account_id": account.account_id,
                "oauth_provider": account.oauth_provider,
                "external_id": account.external_id,
                "wa_id": account.wa_id,
                "tenant_id": account.tenant_id,
                "customer_email": account.customer_email,
                "balance_minor": account.balance_minor,
                "currency": account.currency,
                "plan_name": account.plan_name,
                "status": account.status,
                "paid_credits": account.paid_credits,
                "marketing_opt_in": False,
                "marketing_opt_in_at": None,
                "marketing_opt_in_source": None,
                "created_at": account.created_at,
                "updated_at": _now_iso(),
            }

    # -- charges (section 3.2) -----------------------------------------------------------------
    def charge(self, body: dict[str, Any], *, duplicate_as_201: bool = False) -> dict[str, Any]:
        key = (body["oauth_provider"], body["external_id"])
        with self.lock:
            account = self.accounts.get(key)
            if account is not None:
                self._touch_metadata(account, body)
            idem = body.get("idempotency_key")
            if idem is not None:
                existing = self._find("charge", idem)
                if existing is not None:
                    # The concurrent-duplicate path (3.2 step 6) comes from the per-account unique
                    # constraint, so it answers 201 only within the same account.
                    if duplicate_as_201 and existing.account_key == key:
                        return self._charge_view(existing)
                    raise BackendError(
                        409, "Charge already exists", {"X-Existing-Charge-ID": existing.transaction_id}
                    )
            if account is None:
                raise BackendError(404, "Account not found")
            if account.status == "suspended":
                raise BackendError(403, "Account suspended: Account suspended")
            if account.status == "closed":
                raise BackendError(403, "Account is closed")
            if body["currency"] != account.currency:
                raise BackendError(500, "Database integrity error")
            self._daily_reset(account)
            amount = body["amount_minor"]
            pool = "paid"
            if account.daily_free_uses_remaining > 0:
                account.daily_free_uses_remaining -= 1
                pool = "daily"
            elif account.free_uses_remaining > 0:
                account.free_uses_remaining -= 1
                pool = "free"
            elif account.paid_credits < amount:
                raise BackendError(
                    402, f"Insufficient credits. Balance: {account.paid_credits}, Required: {amount}"
                )
            else:
                account.paid_credits -= amount
                account.balance_minor = account.paid_credits
            account.total_uses += 1
            meta = body.get("metadata") or {}
            txn = LedgerEntry(
                transaction_id=str(uuid.uuid4()),
                account_key=key,
                type="charge",
                amount_minor=amount,
                currency=body["currency"],
                description=body["description"],
                created_at=_now_iso(),
                balance_after=account.paid_credits,
                idempotency_key=idem,
                metadata={k: meta.get(k) for k in ("message_id", "agent_id", "channel_id", "request_id")},
                pool=pool,
            )
            self.transactions.append(txn)
            return self._charge_view(txn)

    def _find(self, kind: str, idempotency_key: str) -> LedgerEntry | None:
        # Global lookup: not scoped to the account (section 3.2 step 2).
        for txn in self.transactions:
            if txn.type == kind and txn.idempotency_key == idempotency_key:
                return txn
        return None

    def _charge_view(self, txn: LedgerEntry) -> dict[str, Any]:
        return {
            "charge_id": txn.transaction_id,
            "account_id": self.accounts[txn.account_key].account_id,
            "amount_minor": txn.amount_minor,
            "currency": txn.currency,
            "balance_after": txn.balance_after,
            "created_at": txn.created_at,
            "description": txn.description,
            "metadata": txn.metadata,
        }

    # -- credits (section 3.3) -----------------------------------------------------------------
    def add_credits(self, body: dict[str, Any]) -> dict[str, Any]:
        key = (body["oauth_provider"], body["external_id"])
        with self.lock:
            account = self.accounts.get(key)
            if account is None:
                raise BackendError(404, "Account not found")
            self._touch_metadata(account, body)
            idem = body.get("idempotency_key")
            if idem is not None:
                existing = self._find("credit", idem)
                if existing is not None:
                    raise BackendError(
                        409, "Credit already exists", {"X-Existing-Credit-ID": existing.transaction_id}
                    )
            if body["currency"] != account.currency:
                raise BackendError(
                    400,
                    f"Data integrity error: Currency mismatch: account={account.currency}, "
                    f"credit={body['currency']}",
                )
            return self._credit(account, body)

    def _credit(self, account: Account, body: dict[str, Any]) -> dict[str, Any]:
        account.paid_credits += body["amount_minor"]
        account.balance_minor = account.paid_credits
        txn = LedgerEntry(
            transaction_id=str(uuid.uuid4()),
            account_key=(account.oauth_provider, account.external_id),
            type="credit",
            amount_minor=body["amount_minor"],
            currency=body["currency"],
            description=body["description"],
            created_at=_now_iso(),
            balance_after=account.paid_credits,
            idempotency_key=body.get("idempotency_key"),
            transaction_type=body["transaction_type"],
            external_transaction_id=body.get("external_transaction_id"),
        )
        self.transactions.append(txn)
        return {
            "credit_id": txn.transaction_id,
            "account_id": account.account_id,
            "amount_minor": txn.amount_minor,
            "currency": txn.currency,
            "balance_after": txn.balance_after,
            "transaction_type": txn.transaction_type,
            "description": txn.description,
            "external_transaction_id": txn.external_transaction_id,
            "created_at": txn.created_at,
        }

    def grant(self, account: Account, credits: int) -> None:
        with self.lock:
            self._credit(
                account,
                {
                    "amount_minor": credits,
                    "currency": account.currency,
                    "description": "Manual grant",
                    "transaction_type": "grant",
                },
            )

    # -- purchases (sections 3.5-3.7) ----------------------------------------------------------
    def purchase(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self.pricing.stripe_configured:
            raise BackendError(503, "Payment provider not configured")
        key = (body["oauth_provider"], body["external_id"])
        with self.lock:
            account = self.accounts.get(key) or self._create(
                key, self.pricing.free_uses_purchase_created, body
            )
            self._touch_metadata(account, body)
            # Stripe idempotency key purchase-v3-{account}-{unix_seconds}: a repeat in the same second
            # gets the same PaymentIntent, any later call a new one.
            stripe_key = f"purchase-v3-{account.account_id}-{int(self.now().timestamp())}"
            payment_id = self._purchase_keys.get(stripe_key)
            if payment_id is None:
                payment_id = f"pi_{secrets.token_hex(12)}"
                self.payments[payment_id] = PaymentIntent(
                    payment_id=payment_id,
                    client_secret=f"{payment_id}_secret_{secrets.token_hex(12)}",
                    account_key=key,
                    amount_minor=self.pricing.price_per_purchase_minor,
                )
                self._purchase_keys[stripe_key] = payment_id
            return self.payment_view(self.payments[payment_id])

    def payment_view(self, intent: PaymentIntent) -> dict[str, Any]:
        return {
            "payment_id": intent.payment_id,
            "client_secret": intent.client_secret,
            "amount_minor": intent.amount_minor,
            "currency": "USD",
            "uses_purchased": self.pricing.paid_uses_per_purchase,  # today's value (section 3.6)
            "status": intent.status,
            "publishable_key": self.pricing.publishable_key,
        }

    def payment(self, payment_id: str) -> dict[str, Any]:
        if not self.pricing.stripe_configured:
            raise BackendError(503, "Payment provider not configured")
        with self.lock:
            intent = self.payments.get(payment_id)
            if intent is None:  # no ownership check, and any Stripe error is a 404 (section 3.6)
                raise BackendError(404, f"Payment not found: {payment_id}")
            return self.payment_view(intent)

    def set_payment_status(self, payment_id: str, status: str) -> None:
        with self.lock:
            self.payments[payment_id].status = status

    def deliver_webhook(self, payment_id: str) -> bool:
        """`payment_intent.succeeded`: credit the purchase once (idempotency key `stripe-{pi}`)."""
        with self.lock:
            intent = self.payments[payment_id]
            if intent.status != "succeeded" or intent.credited:
                return False
            account = self.accounts[intent.account_key]
            self._credit(
                account,
                {
                    "amount_minor": self.pricing.paid_uses_per_purchase,
                    "currency": "USD",
                    "description": f"Purchase {self.pricing.paid_uses_per_purchase} uses",
                    "transaction_type": "purchase",
                    "external_transaction_id": payment_id,
                    "idempotency_key": f"stripe-{payment_id}",
                },
            )
            intent.credited = True
            return True

    # -- app store purchases (section 3.9) -----------------------------------------------------
    def verify_store(self, store: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        """`google-play/verify` or `apple-storekit/verify`: add the product's credits once per token."""
        products = GOOGLE_PLAY_PRODUCTS if store == "google-play" else APP_STORE_PRODUCTS
        # Without a product id, the fake App Store's record of every transaction is the smallest pack.
        product_id = body.get("product_id") or APP_STORE_DEFAULT_PRODUCT
        if product_id not in products:
            raise BackendError(400, f"Unknown product ID: {product_id}")
        if token.startswith(INVALID_PURCHASE_PREFIX):
            raise BackendError(400, "Purchase not valid: state=1")
        key = (body["oauth_provider"], body["external_id"])
        with self.lock:
            account = self.accounts.get(key) or self._create(key, self.pricing.free_uses_per_account, body)
            self._touch_metadata(account, body)
            done = self.store_purchases.get((store, token))
            added = 0
            if done is None:
                done = f"{store}-order-{len(self.store_purchases) + 1}"
                added = products[product_id]
                self._credit(
                    account,
                    {
                        "amount_minor": added,
                        "currency": "USD",
                        "description": f"{store} purchase {product_id}",
                        "transaction_type": "purchase",
                        "external_transaction_id": done,
                    },
                )
                self.store_purchases[(store, token)] = done
            return {
                "success": True,
                "credits_added": added,
                "new_balance": account.paid_credits,
                "order_id": done,
                "purchase_time_millis": int(self.now().timestamp() * 1000),
                "already_processed": added == 0,
            }

    # -- transactions (section 3.9) ------------------------------------------------------------
    def list_transactions(self, key: tuple[str, str], limit: int, offset: int) -> dict[str, Any]:
        with self.lock:
            mine = [t for t in reversed(self.transactions) if t.account_key == key]
            page = mine[offset : offset + limit]  # a Python slice, no range checks
            return {
                "transactions": [
                    {
                        "transaction_id": t.transaction_id,
                        "type": t.type,
                        "amount_minor": -t.amount_minor if t.type == "charge" else t.amount_minor,
                        "currency": t.currency,
                        "description": t.description,
                        "created_at": t.created_at,
                        "balance_after": t.balance_after,
                        "transaction_type": t.transaction_type,
                        "external_transaction_id": t.external_transaction_id,
                        "metadata": t.metadata,
                    }
                    for t in page
                ],
                "total_count": len(mine),
                "has_more": offset + len(page) < len(mine),
            }
