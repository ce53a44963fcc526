"""Wire models: every request body and reply of the billing and login routes.

The reply models enforce what existing clients rely on (`../shared/spec/COMPATIBILITY.md`): the seven
`/credits` fields are always present, integers are never null or negative, and the credit fields agree
with each other. A provider that produces an inconsistent status fails loudly here instead of
confusing a UI.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

PaymentState = Literal[
    "succeeded",
    "processing",
    "pending",
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "requires_capture",
    "failed",
    "canceled",
    "unknown",
]

NonNegative = Field(ge=0)


class _Request(BaseModel):
    # Unknown fields are ignored (clients send extras such as agent ids); wrong types are not coerced.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class _Reply(BaseModel):
    # Unknown fields are ignored: the client parses replies with these same models, and servers may
    # add fields (COMPATIBILITY.md: additive fields are safe).
    model_config = ConfigDict(extra="ignore", frozen=True)


class PurchaseOptions(_Reply):
    price_minor: int = Field(ge=0)
    uses: int = Field(ge=1)
    currency: str = Field(min_length=3, max_length=3)


class CreditStatus(_Reply):
    """`GET /credits`. The last three fields are additive extras, left out of the JSON when unset."""

    has_credit: bool
    credits_remaining: int = Field(ge=0)
    free_uses_remaining: int = Field(ge=0)
    total_uses: int = Field(ge=0)
    plan_name: str | None
    purchase_required: bool
    purchase_options: PurchaseOptions | None
    reason: str | None = None
    daily_free_uses_remaining: int | None = Field(default=None, ge=0)
    daily_free_uses_limit: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        available = self.credits_remaining + self.free_uses_remaining
        if self.has_credit and available <= 0:
            raise ValueError("has_credit is true but no credits or free uses remain")
        if not self.has_credit and available != 0:
            raise ValueError("has_credit is false but credits or free uses remain")
        if self.purchase_required and self.purchase_options is None:
            raise ValueError("purchase_required is true but purchase_options is missing")
        if not self.purchase_required and self.purchase_options is not None:
            raise ValueError("purchase_options is only given when a purchase is required")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_extras(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in ("reason", "daily_free_uses_remaining", "daily_free_uses_limit"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class PurchaseRequest(_Request):
    """`POST /purchase/initiate` body: `{}` or `{"return_url": ...}`."""

    return_url: str | None = Field(default=None, min_length=1, max_length=2048)


class PurchaseInitiated(_Reply):
    payment_id: str = Field(min_length=1)
    client_secret: str
    amount_minor: int = Field(ge=0)
    currency: str
    uses_purchased: int = Field(ge=0)
    publishable_key: str


class PurchaseStatus(_Reply):
    status: PaymentState
    credits_added: int = Field(default=0, ge=0)
    balance_after: int = Field(default=0, ge=0)


class Transaction(_Reply):
    """One entry of `GET /transactions`: a charge (negative `amount_minor`) or a credit."""

    transaction_id: str
    type: Literal["charge", "credit"]
    amount_minor: int
    currency: str
    description: str
    created_at: str
    balance_after: int


class TransactionPage(_Reply):
    transactions: list[Transaction]
    total_count: int = Field(ge=0)
    has_more: bool


class LoginRequest(_Request):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)


class LoginReply(_Reply):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - a scheme name, not a secret
    expires_in: int
    user_id: str
    role: str


class InteractRequest(_Request):
    """The demo agent's `POST /v1/agent/interact` body."""

    message: str = Field(min_length=1, max_length=4000)


class InteractReply(_Reply):
    reply: str
    user_id: str
    credits_remaining: int
    free_uses_remaining: int
