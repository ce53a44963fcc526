"""The backend's request bodies (section 2-3 of `docs/billing-backend.md`), validated the way it does.

Pydantic in lax mode, as the real service's FastAPI models are: `"3"` becomes 3, `3.5` is refused.
Validation failures are shaped like the backend's 422 handler: `{type, loc, msg, input[, ctx]}`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class IdentityFields(_Body):
    oauth_provider: str = Field(min_length=1, max_length=255)
    external_id: str = Field(min_length=1, max_length=255)
    wa_id: str | None = Field(default=None, max_length=255)
    tenant_id: str | None = Field(default=None, max_length=255)

    @field_validator("oauth_provider")
    @classmethod
    def _oauth_prefix(cls, value: str) -> str:
        if not value.startswith("oauth:"):
            raise ValueError('oauth_provider must start with "oauth:"')
        return value


class MetadataFields(_Body):
    customer_email: str | None = Field(default=None, min_length=1, max_length=255)
    display_name: str | None = Field(default=None, min_length=1, max_length=255)
    user_role: str | None = Field(default=None, max_length=50)
    agent_id: str | None = Field(default=None, max_length=255)
    marketing_opt_in: bool = False
    marketing_opt_in_source: str | None = Field(default=None, max_length=50)


class Context(_Body):
    agent_id: str | None = None
    channel_id: str | None = None
    request_id: str | None = None


class CheckRequest(IdentityFields, MetadataFields):
    context: Context = Field(default_factory=Context)


class AccountRequest(IdentityFields, MetadataFields):
    initial_balance_minor: int = Field(default=0, ge=0)
    currency: str = Field(default="USD", min_length=3, max_length=3)
    plan_name: str = Field(default="free", min_length=1, max_length=100)


class ChargeMetadata(_Body):
    message_id: str | None = None
    agent_id: str | None = None
    channel_id: str | None = None
    request_id: str | None = None


class _Money(_Body):
    amount_minor: int = Field(gt=0)
    currency: str = Field(min_length=3, max_length=3)
    description: str = Field(min_length=1)
    idempotency_key: str | None = Field(default=None, max_length=255)

    @field_validator("currency")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()


class ChargeRequest(IdentityFields, MetadataFields, _Money):
    metadata: ChargeMetadata | None = None


class CreditRequest(IdentityFields, MetadataFields, _Money):
    transaction_type: Literal["purchase", "grant", "refund", "adjustment"]
    external_transaction_id: str | None = Field(default=None, max_length=255)


class BackendPurchaseBody(IdentityFields, MetadataFields):
    customer_email: str = Field(min_length=1, max_length=255)
    return_url: str | None = Field(default=None, min_length=1)
    display_name: str | None = Field(default=None, max_length=255)


class _StorePurchase(IdentityFields, MetadataFields):
    product_id: str = Field(min_length=1, max_length=255)

    @field_validator("purchase_token", "transaction_id", mode="before", check_fields=False)
    @classmethod
    def _trimmed(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value


class GooglePlayVerifyBody(_StorePurchase):
    purchase_token: str = Field(min_length=10, max_length=4096)
    package_name: str = Field(min_length=1, max_length=255)


class AppStoreVerifyBody(_StorePurchase):
    transaction_id: str = Field(min_length=10, max_length=4096)
    #: The App Store's record of a transaction names its product: the iOS app sends none.
    product_id: str | None = Field(default=None, min_length=1, max_length=255)  # type: ignore[assignment]


class ToolChargeBody(_Body):
    """`POST /v1/tools/charge` (3.9): no `oauth:` validator here, unlike the billing bodies."""

    product_type: str = Field(min_length=1, max_length=64)
    oauth_provider: str = Field(min_length=1, max_length=255)
    external_id: str = Field(min_length=1, max_length=255)
    wa_id: str | None = Field(default=None, max_length=255)
    tenant_id: str | None = Field(default=None, max_length=255)
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_id: str | None = Field(default=None, max_length=255)


class ToolPurchaseBody(_Body):
    """`POST /v1/tools/purchase/verify`, shaped after what the CIRIS agent sends (the backend's
    public source does not show it yet); with an API key the identity comes in the body too."""

    product_id: str = Field(min_length=1, max_length=255)
    purchase_token: str = Field(min_length=10, max_length=4096)
    tool_name: str = Field(min_length=1, max_length=64)
    oauth_provider: str | None = Field(default=None, min_length=1, max_length=255)
    external_id: str | None = Field(default=None, min_length=1, max_length=255)


class InvalidBody(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("invalid body")
        self.errors = errors


def parse(model: type[_Body], raw: bytes) -> dict[str, Any]:
    """Validate a JSON body; the result is the model dumped back to plain data."""
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise InvalidBody(
            [
                {
                    "type": "json_invalid",
                    "loc": ["body", 0],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": str(exc).split(":")[0]},
                }
            ]
        ) from None
    if data is None:
        raise InvalidBody([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])
    try:
        return model.model_validate(data).model_dump()
    except ValidationError as exc:
        raise InvalidBody(fastapi_errors(exc)) from None


def fastapi_errors(exc: ValidationError) -> list[dict[str, Any]]:
    errors = []
    for err in exc.errors(include_url=False):
        item: dict[str, Any] = {
            "type": err["type"],
            "loc": ["body", *err["loc"]],
            "msg": err["msg"],
            "input": err.get("input"),
        }
        if "ctx" in err:
            item["ctx"] = {k: str(v) for k, v in err["ctx"].items()}
        errors.append(item)
    return errors
