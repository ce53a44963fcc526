"""Wire models: every request body and reply of the billing and auth routes.

The reply models enforce what existing clients rely on (`docs/compatibility.md`): the seven
`/credits` fields are always present, integers are never null or negative, and the credit fields agree
with each other. A provider that produces an inconsistent status fails loudly here instead of
confusing a UI.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Self, get_args

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
PAYMENT_STATES: Final[frozenset[str]] = frozenset(get_args(PaymentState))


class _Request(BaseModel):
    # Unknown fields are ignored (clients send extras such as agent ids); wrong types are not coerced.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class _Reply(BaseModel):
    # Unknown fields are ignored (docs/compatibility.md: additive fields are safe); types are strict on
    # both sides: a JSON true is no integer, 5.0 is no count.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


# The *Reply models are the wire contract as existing clients rely on it (docs/compatibility.md): what
# the client accepts from any CIRIS agent. The server's models below subclass them and tighten them
# (bounds, consistency rules, required publishable key), so field names cannot drift apart.


class ErrorReply(_Reply):
    """Every error: a plain, stable English sentence (clients match words in it)."""

    detail: str


class PurchaseOptionsReply(_Reply):
    price_minor: int
    uses: int
    currency: str


class PurchaseOptions(PurchaseOptionsReply):
    price_minor: int = Field(ge=0)
    uses: int = Field(ge=1)
    currency: str = Field(min_length=3, max_length=3)


class CreditStatusReply(_Reply):
    has_credit: bool
    credits_remaining: int
    free_uses_remaining: int
    total_uses: int
    plan_name: str | None
    purchase_required: bool
    purchase_options: PurchaseOptionsReply | None
    reason: str | None = None
    daily_free_uses_remaining: int | None = None
    daily_free_uses_limit: int | None = None


class CreditStatus(CreditStatusReply):
    """`GET /credits`. The last fields are additive extras, left out of the JSON when unset.

    Daily free uses are counted into `free_uses_remaining` (the seed's UI adds only
    `credits_remaining + free_uses_remaining`), and how many of those are daily is said as
    `daily_free_uses_included`, never as `daily_free_uses_remaining`: the CIRIS apps add that one
    on top (`credits + free + daily`), so both sums show the true uses left only when it is absent.
    A provider that still sets `daily_free_uses_remaining` (counted into the free uses, as this
    model always required) has it moved to `daily_free_uses_included`.
    """

    credits_remaining: int = Field(ge=0)
    free_uses_remaining: int = Field(ge=0)
    total_uses: int = Field(ge=0)
    purchase_options: PurchaseOptions | None
    daily_free_uses_remaining: None = None
    daily_free_uses_limit: int | None = Field(default=None, ge=0)
    #: How many of `free_uses_remaining` are daily uses (they come back at the next reset).
    daily_free_uses_included: int | None = Field(default=None, ge=0)
    #: When the soonest-expiring credit left expires (ISO 8601, UTC); absent when none expires.
    next_expiry_at: str | None = Field(default=None, min_length=1, max_length=40)

    @model_validator(mode="before")
    @classmethod
    def _daily_is_included(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("daily_free_uses_remaining") is not None:
            data = dict(data)
            daily = data.pop("daily_free_uses_remaining")
            data.setdefault("daily_free_uses_included", daily)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.daily_free_uses_included or 0) > self.free_uses_remaining:
            raise ValueError("daily_free_uses_included counts more uses than free_uses_remaining")
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
        for name in (
            "reason",
            "daily_free_uses_remaining",
            "daily_free_uses_limit",
            "daily_free_uses_included",
            "next_expiry_at",
        ):
            if data.get(name) is None:
                data.pop(name, None)
        return data


#: A pack's id: what `purchase/initiate` names it by.
PACK_ID: Final = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"


class PurchaseRequest(_Request):
    """`POST /purchase/initiate` body: `{}`, `{"return_url": ...}`, and with a provider that sells
    several packs (`/capabilities` lists them) `{"pack": id}` (without one: the first, the default)."""

    return_url: str | None = Field(default=None, min_length=1, max_length=2048)
    pack: str | None = Field(default=None, pattern=PACK_ID)


class PurchaseInitiatedReply(_Reply):
    payment_id: str
    client_secret: str
    amount_minor: int
    currency: str
    uses_purchased: int
    publishable_key: str | None = None  # optional for the SDK, required by the UI contract


class PurchaseInitiated(PurchaseInitiatedReply):
    payment_id: str = Field(min_length=1)
    amount_minor: int = Field(ge=0)
    uses_purchased: int = Field(ge=0)
    publishable_key: str


class PurchaseStatusReply(_Reply):
    status: str
    credits_added: int | None = 0
    balance_after: int | None = 0


class PurchaseStatus(PurchaseStatusReply):
    status: PaymentState
    credits_added: int = Field(default=0, ge=0)
    balance_after: int = Field(default=0, ge=0)


class TransactionReply(_Reply):
    transaction_id: str
    type: str
    amount_minor: int
    currency: str
    description: str
    created_at: str
    balance_after: int | None = None
    #: CIRIS passes these on from its backend (`purchase`, `grant`, `refund`, ... for credits; the
    #: store's or Stripe's id; the charge's `{message_id, agent_id, channel_id, request_id}`).
    transaction_type: str | None = None
    external_transaction_id: str | None = None
    metadata: dict[str, Any] | None = None


#: The fields of a transaction sent only when the provider has them.
TRANSACTION_EXTRAS: Final = ("transaction_type", "external_transaction_id", "metadata")


class Transaction(TransactionReply):
    """One entry of `GET /transactions`: a charge (negative `amount_minor`) or a credit, with the
    extras a provider has (left out of the JSON when it has none)."""

    type: Literal["charge", "credit"]
    balance_after: int
    transaction_type: str | None = Field(default=None, min_length=1, max_length=64)
    external_transaction_id: str | None = Field(default=None, min_length=1, max_length=255)

    @model_serializer(mode="wrap")
    def _drop_missing_extras(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in TRANSACTION_EXTRAS:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class TransactionPageReply(_Reply):
    transactions: list[TransactionReply]
    total_count: int
    has_more: bool


class TransactionPage(TransactionPageReply):
    transactions: list[Transaction]  # type: ignore[assignment]
    total_count: int = Field(ge=0)


class CreditPackReply(_Reply):
    id: str
    uses: int
    price_minor: int
    currency: str


class CreditPack(CreditPackReply):
    """A pack a provider sells: `uses` for `price_minor` (cents) of `currency` (ISO 4217)."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    id: str = Field(pattern=PACK_ID)
    uses: int = Field(ge=1, le=10_000_000)
    price_minor: int = Field(ge=1, le=99_999_999)
    currency: str = Field(pattern=r"^[A-Z]{3}$")

    @model_validator(mode="before")
    @classmethod
    def _upper_currency(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("currency"), str):
            data = {**data, "currency": data["currency"].upper()}
        return data

    @property
    def options(self) -> PurchaseOptions:
        return PurchaseOptions(price_minor=self.price_minor, uses=self.uses, currency=self.currency)


class CapabilitiesReply(_Reply):
    """`GET /capabilities`: what the provider behind the agent offers, declared by the provider, so a
    UI knows before the user clicks whether buying is possible. The last three fields came with the
    mobile store routes; an older agent leaves them out, which reads as false (and `charges` true)."""

    provider: str
    purchases: bool
    transactions: bool
    google_play: bool = False
    apple_storekit: bool = False
    #: False when the gate only checks credit and someone else (CIRIS's LLM proxy) charges.
    charges: bool = True
    #: The products sold per use beside the interaction credits (tool credits), by name; their
    #: balances are at the tool routes (`docs/tool-credits.md`). Older agents leave it out: none.
    products: list[str] = Field(default_factory=list)
    #: At or under this many uses left a UI shows a low-balance notice (and a ledger provider
    #: writes `balance.low` as it is crossed); left out when unset, and by older agents: no notice.
    low_balance_threshold: int | None = None
    #: The packs `purchase/initiate` sells (`{"pack": id}`), the default first; left out of the JSON
    #: by older agents and by providers that sell one unnamed pack.
    packs: list[CreditPackReply] = Field(default_factory=list)


class Capabilities(CapabilitiesReply):
    provider: str = Field(min_length=1)
    packs: list[CreditPack] = Field(default_factory=list)  # type: ignore[assignment]
    #: Only with a stand-in for Stripe.js (`serve --fake-backend`): its path on the agent, which
    #: `<ciris-billing>` loads instead of Stripe's. Left out of the JSON otherwise, so a real
    #: deployment's reply never names one.
    stripe_js: str | None = Field(default=None, pattern=r"^/[^/\\]")

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # Left out when unset: a deployment without them answers as before.
        data: dict[str, Any] = handler(self)
        for name in ("stripe_js", "low_balance_threshold"):
            if data.get(name) is None:
                data.pop(name, None)
        if not data.get("packs"):
            data.pop("packs", None)  # one unnamed pack, as every agent before packs: said by nothing
        return data


class GooglePlayPurchase(_Request):
    """`POST /google-play/verify` body: what the Android app's billing library hands over."""

    #: Not in the repr: the token redeems the purchase, so it stays out of log lines and tracebacks.
    purchase_token: str = Field(min_length=1, max_length=4096, repr=False)
    product_id: str = Field(min_length=1, max_length=255)
    package_name: str = Field(min_length=1, max_length=255)


class AppStorePurchase(_Request):
    """`POST /apple-storekit/verify` body: the StoreKit transaction to redeem. The iOS app sends
    only `transaction_id` (the store's record of the transaction names the product)."""

    transaction_id: str = Field(min_length=1, max_length=4096, repr=False)
    product_id: str | None = Field(default=None, min_length=1, max_length=255)


class StoreVerificationReply(_Reply):
    """The reply of both verify routes, as the CIRIS mobile clients parse it: they read `success` and
    `error`, never a 4xx body, so a refused purchase is a 200 with `success: false`."""

    success: bool
    credits_added: int
    new_balance: int
    already_processed: bool
    error: str | None = None


class StoreVerification(StoreVerificationReply):
    credits_added: int = Field(ge=0)
    new_balance: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.success and (self.credits_added or self.error is None):
            raise ValueError("a failed verification adds nothing and says why in error")
        if self.already_processed and self.credits_added:
            raise ValueError("an already processed purchase adds nothing")
        return self


class LoginRequest(_Request):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)


class LoginReply(_Reply):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - a scheme name, not a secret
    expires_in: int
    user_id: str
    role: str


class RefreshRequest(_Request):
    """`POST /v1/auth/refresh` body: empty, `{}`, or the CIRIS SDK's `{"refresh_token": ...}`, whose
    value is not used: the bearer token is what gets refreshed."""

    refresh_token: str | None = Field(default=None, max_length=4096)


class LogoutRequest(_Request):
    """`POST /v1/auth/logout` body: empty or `{}` to revoke the presented token; `{"everywhere":
    true}` to end every session of its user (all their tokens issued until now)."""

    everywhere: bool = False


class LogoutReply(_Reply):
    status: Literal["logged_out"] = "logged_out"


class UserInfoReply(_Reply):
    """`GET /v1/auth/me`, as the CIRIS SDK's `UserInfo` reads it (`created_at` in ISO 8601)."""

    user_id: str
    username: str
    role: str
    permissions: list[str]
    created_at: str


class InteractRequest(_Request):
    """The demo agent's `POST /v1/agent/interact` body."""

    message: str = Field(min_length=1, max_length=4000)
    #: Demo only: what the interaction costs (weighted spends; `?cost=N` says the same).
    cost: int = Field(default=1, ge=1, le=10, strict=True)


class InteractReply(_Reply):
    reply: str
    user_id: str
    credits_remaining: int
    free_uses_remaining: int
