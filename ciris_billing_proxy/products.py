"""Per-product credits ("tool credits"): what a provider declares it sells beside the interaction
credits, and the wire shapes of the tool routes (`tool_routes.py`), as the CIRIS agent's
`routes/tools.py` answers them, so the CIRIS apps read them unchanged.

A product (`web_search` today at CIRIS) has its own free uses, its own paid credits and its own
price per use; a gated tool call spends one use of that product, never an interaction credit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: CIRIS's tool-name rule (`routes/tools.py`): a letter, then up to 63 letters, digits or `_`.
TOOL_NAME: Final = re.compile(r"[a-zA-Z]\w{0,63}", re.ASCII)


def valid_tool_name(name: str) -> bool:
    return TOOL_NAME.fullmatch(name) is not None


class Product(BaseModel):
    """One product a provider sells per use. `free_uses`: each user's free uses of it; `price_minor`:
    the price of one use in minor units (cents); `packs`: store product id -> uses it adds (what
    `POST {tools}/purchase` redeems); `description`: shown by `GET {tools}/available`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: str = Field(pattern=TOOL_NAME.pattern)
    free_uses: int = Field(default=0, ge=0, le=1_000_000)
    price_minor: int = Field(default=0, ge=0, le=10_000_000)
    description: str = Field(default="", max_length=500)
    packs: Mapping[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _packs(self) -> Self:
        for product_id, uses in self.packs.items():
            if not product_id or len(product_id) > 255 or uses < 1:
                raise ValueError("each pack needs a product id (1-255 characters) and at least 1 use")
        return self


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class ToolBalance(_Wire):
    """`GET {tools}/balance/{tool}` (and each item of `GET {tools}/balance`)."""

    product_type: str
    free_remaining: int = Field(ge=0)
    paid_credits: int = Field(ge=0)
    total_available: int = Field(ge=0)
    price_minor: int = Field(ge=0)
    total_uses: int = Field(ge=0)

    @model_validator(mode="after")
    def _total(self) -> Self:
        if self.total_available != self.free_remaining + self.paid_credits:
            raise ValueError("total_available must be free_remaining + paid_credits")
        return self


class ToolBalances(_Wire):
    """`GET {tools}/balance`: every product the provider declares."""

    balances: list[ToolBalance]


class ToolCheck(_Wire):
    """`GET {tools}/check/{tool}`: whether a gated call of the tool would pass now."""

    has_credit: bool
    product_type: str
    free_remaining: int = Field(ge=0)
    paid_credits: int = Field(ge=0)
    total_available: int = Field(ge=0)

    @classmethod
    def of(cls, balance: ToolBalance, has_credit: bool | None = None) -> ToolCheck:
        return cls(
            has_credit=balance.total_available > 0 if has_credit is None else has_credit,
            product_type=balance.product_type,
            free_remaining=balance.free_remaining,
            paid_credits=balance.paid_credits,
            total_available=balance.total_available,
        )


class ToolInfo(_Wire):
    name: str
    description: str
    #: Credits per use (CIRIS: 1.0).
    cost: float
    available: bool
    platform_requirements: list[str] = Field(default_factory=list)


class AvailableTools(_Wire):
    """`GET {tools}/available`. `platform` is `server` here (CIRIS reports the device it runs on),
    and `has_google_auth` says whether the provider reads the user's Google ID token."""

    tools: list[ToolInfo]
    platform: str
    has_google_auth: bool


class ToolPurchaseRequest(_Wire):
    """`POST {tools}/purchase` body, as the Android app sends it after a Google Play purchase."""

    product_id: str = Field(min_length=1, max_length=255)
    #: Not in the repr: the token redeems the purchase.
    purchase_token: str = Field(min_length=1, max_length=4096, repr=False)
    #: The rule is stated in the schema, but checked by the route: a name breaking it is CIRIS's 400.
    tool_name: str = Field(
        min_length=1, max_length=64, json_schema_extra={"pattern": f"^{TOOL_NAME.pattern}$"}
    )


class ToolPurchase(_Wire):
    """The reply of `POST {tools}/purchase`: `new_balance` is the product's uses available after."""

    success: bool
    product_type: str
    credits_added: int = Field(ge=0)
    new_balance: int = Field(ge=0)
    message: str
