"""The backend's reply shapes (`docs/billing-backend.md` 3.1, 3.5, 3.9), mapped onto the UI contract."""

from __future__ import annotations

import re
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, field_validator

from ...errors import ProviderUnavailable
from ...models import CreditStatus, PurchaseOptions, StoreVerification

#: Stripe states of a PaymentIntent the user can still pay.
AWAITING_PAYMENT: Final = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})
#: Check reasons of accounts that may not buy (the backend would sell to them all the same).
BLOCKED: Final = frozenset({"Account suspended", "Account closed"})


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


class BackendVerification(BaseModel):
    """The verify endpoints' 200 (3.9): `/v1/billing/*` always has `success: true`; the `/v1/user/*`
    variant may say `success: false` with an `error`."""

    model_config = ConfigDict(extra="ignore")

    success: bool = True
    credits_added: int = 0
    new_balance: int = 0
    already_processed: bool = False
    error: str | None = None


NOT_VERIFIED: Final = "The purchase could not be verified"


def to_store_verification(body: Any) -> StoreVerification:
    """A 200 of a verify endpoint as the mobile apps read it (`ProviderUnavailable` if malformed)."""
    try:
        backend = BackendVerification.model_validate(body)
        if not backend.success:
            return refused(backend.error or NOT_VERIFIED)
        return StoreVerification(
            success=True,
            credits_added=0 if backend.already_processed else max(backend.credits_added, 0),
            new_balance=max(backend.new_balance, 0),
            already_processed=backend.already_processed,
        )
    except ValueError:  # pydantic's ValidationError is one
        raise ProviderUnavailable("malformed verification", maybe_applied=False) from None


def refused(error: str) -> StoreVerification:
    return StoreVerification(
        success=False, credits_added=0, new_balance=0, already_processed=False, error=error
    )


OWN_CHARGE: Final = re.compile(r"^(Agent interaction) [0-9a-f]{32}$")


def public_transaction(item: Any) -> Any:
    """A backend transaction as the user sees it: without the request key this proxy puts in its
    charges' descriptions (to find them after a timeout)."""
    if isinstance(item, dict) and isinstance(item.get("description"), str):
        return {**item, "description": OWN_CHARGE.sub(r"\1", item["description"])}
    return item


def to_credit_status(backend: BackendCredit) -> CreditStatus:
    """Map the backend's check onto the UI contract, keeping its consistency rules.

    Daily free uses are counted into `free_uses_remaining` and said as `daily_free_uses_included`
    (see `CreditStatus`); when the backend says there is no credit (including suspended or closed
    accounts, which may still hold uses) both counts are 0.
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
        daily_free_uses_limit=max(backend.daily_free_uses_limit, 0),
        daily_free_uses_included=max(backend.daily_free_uses_remaining, 0) if has_credit else 0,
    )
