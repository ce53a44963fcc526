"""Settings of the `stripe` provider: the Stripe keys, the webhook secret, the packs, free uses, and
where its records are kept."""

from __future__ import annotations

import json
import re
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from ...config import ConfigError
from ...models import CreditPack
from ..base import ProviderContext
from ..ciris.settings import check_base_url

#: Environment variable -> option name; the configuration reference (docs site) is generated from these.
ENV_VARS: Final = {
    "CIRIS_STRIPE_SECRET_KEY": "secret_key",
    "CIRIS_STRIPE_PUBLISHABLE_KEY": "publishable_key",
    "CIRIS_STRIPE_WEBHOOK_SECRET": "webhook_secret",
    "CIRIS_STRIPE_PACKS": "packs",
    "CIRIS_STRIPE_FREE_USES": "free_uses",
    "CIRIS_STRIPE_API_BASE": "api_base",
    "CIRIS_STRIPE_DATABASE": "database",
    "CIRIS_STRIPE_TIMEOUT_SECONDS": "timeout_seconds",
    "CIRIS_STRIPE_PLAN_NAME": "plan_name",
}
SECRET_KEY_SHAPE: Final = re.compile(r"(sk|rk)_(test|live)_[A-Za-z0-9_]{1,250}")
PUBLISHABLE_KEY_SHAPE: Final = re.compile(r"pk_(test|live)_[A-Za-z0-9_]{1,250}")
WEBHOOK_SECRET_SHAPE: Final = re.compile(r"whsec_[A-Za-z0-9_]{1,250}")
DEFAULT_PACKS: Final = (CreditPack(id="default", uses=20, price_minor=500, currency="USD"),)


class StripeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The Stripe secret key (`sk_test_...`, `sk_live_...`, or a restricted `rk_...` that may write
    #: PaymentIntents and read events). Required.
    secret_key: SecretStr
    #: The publishable key (`pk_...`) the page's Stripe.js confirms payments with. Required.
    publishable_key: str
    #: The signing secret of the webhook endpoint (`whsec_...`). Without one the webhook route
    #: answers 400 to everything and purchases are settled by their status polls alone.
    webhook_secret: SecretStr | None = None
    #: How old a webhook's signature may be, in seconds (Stripe's library default: 300).
    webhook_tolerance_seconds: int = Field(default=300, ge=1, le=3600)
    #: What is sold: a JSON list of `{"id", "uses", "price_minor", "currency"}`, the default first.
    packs: tuple[CreditPack, ...] = Field(default=DEFAULT_PACKS, min_length=1, max_length=20)
    #: Uses each new user gets free (a `free` grant when first seen).
    free_uses: int = Field(default=0, ge=0, le=1_000_000)
    #: The `plan_name` shown.
    plan_name: str = Field(default="stripe", min_length=1, max_length=100)
    #: Stripe's API base (default Stripe's own); a local stand-in such as the fake Stripe of
    #: `serve --fake-stripe`. `https`, or plain `http` on a loopback address only.
    api_base: str | None = None
    #: A SQLite file or `:memory:` for the provider's records; when set it wins over `database_url`
    #: (default: `database_url`, else `stripe.sqlite3` in the data directory).
    database: str | None = None
    #: Budget of one call to Stripe, retries included.
    timeout_seconds: float = Field(default=20.0, gt=0, le=120)
    #: Network retries of a call to Stripe (each with the same idempotency key, so never twice).
    max_retries: int = Field(default=2, ge=0, le=5)
    #: A purchase started by the same user this recently is returned again instead of a new one.
    purchase_reuse_seconds: float = Field(default=10.0, ge=0, le=3600)
    #: New PaymentIntents one user may start per `purchase_window_seconds` (0: no limit).
    purchase_max_per_user: int = Field(default=10, ge=0, le=100_000)
    #: The window of `purchase_max_per_user`, in seconds.
    purchase_window_seconds: float = Field(default=3600.0, gt=0, le=7 * 86_400)

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr) -> SecretStr:
        if not SECRET_KEY_SHAPE.fullmatch(value.get_secret_value()):
            raise ValueError("must be a Stripe secret key (sk_test_..., sk_live_... or rk_...)")
        return value

    @field_validator("publishable_key")
    @classmethod
    def _publishable_key(cls, value: str) -> str:
        if not PUBLISHABLE_KEY_SHAPE.fullmatch(value):
            raise ValueError("must be a Stripe publishable key (pk_test_... or pk_live_...)")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not WEBHOOK_SECRET_SHAPE.fullmatch(value.get_secret_value()):
            raise ValueError("must be a Stripe webhook signing secret (whsec_...)")
        return value

    @field_validator("packs", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError('must be a JSON list of {"id", "uses", "price_minor", "currency"}') from None
        return value

    @field_validator("packs")
    @classmethod
    def _distinct(cls, value: tuple[CreditPack, ...]) -> tuple[CreditPack, ...]:
        if len({pack.id for pack in value}) != len(value):
            raise ValueError("pack ids must be distinct")
        return value

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str | None) -> str | None:
        return None if value is None else check_base_url(value)

    @classmethod
    def from_context(cls, context: ProviderContext) -> StripeSettings:
        """Options over `CIRIS_STRIPE_*` variables (see `ENV_VARS`); both keys are required."""
        for var, option in (
            ("CIRIS_STRIPE_SECRET_KEY", "secret_key"),
            ("CIRIS_STRIPE_PUBLISHABLE_KEY", "publishable_key"),
        ):
            if not (context.options.get(option) or context.environ.get(var)):
                raise ConfigError(
                    f"{context.provider} provider: {var} is required (see docs/stripe-provider.md)"
                )
        return context.settings(cls, env=ENV_VARS)
