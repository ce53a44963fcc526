"""Settings of the `ciris` provider: where the billing backend is, the API key, and time budgets."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from yarl import URL

from ...config import ConfigError
from ..base import ProviderContext

DEFAULT_API_URL: Final = "https://billing.ciris.ai"
API_KEY_SHAPE: Final = re.compile(r"cbk_[A-Za-z0-9_\-]{1,200}")

#: Environment variable -> option name; the configuration reference (docs site) is generated from these.
ENV_VARS: Final = {
    "CIRIS_BILLING_API_URL": "api_url",
    "CIRIS_BILLING_API_KEY": "api_key",
    "CIRIS_BILLING_FALLBACK_URLS": "fallback_urls",
    "STRIPE_PUBLISHABLE_KEY": "stripe_publishable_key",
    "CIRIS_BILLING_TIMEOUT_SECONDS": "timeout_seconds",
    "CIRIS_BILLING_PURCHASE_TIMEOUT_SECONDS": "purchase_timeout_seconds",
    "CIRIS_BILLING_CONNECT_TIMEOUT_SECONDS": "connect_timeout_seconds",
    "CIRIS_BILLING_MAX_RETRIES": "max_retries",
    "CIRIS_BILLING_CREDIT_WAIT_SECONDS": "credit_wait_seconds",
    "CIRIS_BILLING_PURCHASE_REUSE_SECONDS": "purchase_reuse_seconds",
    "CIRIS_BILLING_PURCHASE_MAX_PER_USER": "purchase_max_per_user",
    "CIRIS_BILLING_PURCHASE_WINDOW_SECONDS": "purchase_window_seconds",
    "CIRIS_BILLING_DATABASE": "database",
    "CIRIS_BILLING_AUTH_MODE": "auth_mode",
    "CIRIS_BILLING_REPLAY_SECRET": "replay_secret",
    "CIRIS_BILLING_ACCEPTED_REPLAY_SECRETS": "accepted_replay_secrets",
    "CIRIS_BILLING_ID_TOKEN_FROM_ENV": "id_token_from_env",
    "CIRIS_BILLING_ENV_FILE": "env_file",
    "CIRIS_BILLING_REFRESH_SIGNAL_FILE": "refresh_signal_file",
}

#: The shortest replay secret taken: it keys AES-256-GCM (through HKDF), so about 256 bits of it.
MIN_REPLAY_SECRET: Final = 32


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_base_url(value: str) -> str:
    url = URL(value)
    if not url.is_absolute() or url.host is None:
        raise ValueError("must be an absolute URL such as https://billing.ciris.ai")
    if url.user or url.password or url.query_string or url.fragment:
        raise ValueError("must not carry credentials, a query or a fragment")
    if url.scheme != "https" and not (url.scheme == "http" and _is_loopback(url.host)):
        raise ValueError("must use https (plain http is allowed only for loopback addresses)")
    return str(url).rstrip("/")


class CirisSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Required in `api_key` mode; not used in `id_token` mode.
    api_key: SecretStr | None = None
    #: How the backend is told who calls: the agent's API key (`api_key`, the default when a key is
    #: set), or the user's own Google/Apple ID token from the request (`id_token`, native apps), in
    #: which the backend takes no charges, sells no Stripe purchases and lists no transactions.
    auth_mode: Literal["api_key", "id_token"] = "api_key"
    #: Backend base URL; `https` unless it is a loopback address.
    api_url: str = DEFAULT_API_URL
    #: Base URLs tried in turn when one fails (comma-separated in the environment).
    fallback_urls: tuple[str, ...] = ()
    #: Used when the backend's purchase reply has no `publishable_key`.
    stripe_publishable_key: str | None = None
    #: Whole budget of one credit check, charge, refund or status read, retries included.
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    #: Budget of one purchase call (the backend calls Stripe synchronously); never retried blindly.
    purchase_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    #: TCP/TLS connect timeout per attempt.
    connect_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    #: Retries of idempotent calls (backoff 0.2 s, 0.4 s, ..., within the budget).
    max_retries: int = Field(default=2, ge=0, le=10)
    backoff_seconds: float = Field(default=0.2, ge=0, le=10)
    #: How long after Stripe reports success the proxy waits for the webhook's credits before it
    #: answers `unknown` instead of `processing`.
    credit_wait_seconds: float = Field(default=120.0, gt=0, le=86_400)
    #: A purchase started by the same user this recently is returned again instead of a new one.
    purchase_reuse_seconds: float = Field(default=10.0, ge=0, le=3600)
    #: New PaymentIntents one user may start per `purchase_window_seconds` (0: no limit); beyond it
    #: initiate answers 429 with `Retry-After`. Replays (a key's, a double click's) do not count.
    purchase_max_per_user: int = Field(default=10, ge=0, le=100_000)
    #: The window of `purchase_max_per_user`, in seconds.
    purchase_window_seconds: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    #: How long after it was sent a charge is waited for in the backend's listing before a failed
    #: interaction's refund concludes it never landed: the backend finishes requests whose client
    #: went away (behind a proxy timeout of 60 s), so a charge whose reply was lost can land late.
    reconcile_window_seconds: float = Field(default=120.0, gt=0, le=3600)
    #: A SQLite payment-ownership file, or `:memory:`; when set it wins over `database_url`
    #: (default: `database_url`, else `ciris-payments.sqlite3` in the data directory).
    database: str | None = None
    #: What purchase replies are sealed with at rest (docs/operations.md, "Rotating the backend API
    #: key"). Unset: the API key, so every replica needs the same one. Set (the same on every
    #: replica), the API key can change without a replay failing to open.
    replay_secret: SecretStr | None = Field(default=None, min_length=MIN_REPLAY_SECRET)
    #: More secrets whose sealed replies still open, never used to seal: the secret (or API key)
    #: replies were sealed with before, or the one some replicas seal with already, mid-rotation.
    accepted_replay_secrets: tuple[SecretStr, ...] = ()
    #: Opt-in: a request without an ID-token header uses the token in the agent's environment
    #: (`CIRIS_BILLING_GOOGLE_ID_TOKEN` / `CIRIS_BILLING_APPLE_ID_TOKEN`), as the CIRIS apps set it
    #: for an agent on the user's own device. On a server with many users it would bill every one
    #: of them to that one account.
    id_token_from_env: bool = False
    #: The agent's `.env` file the app rewrites with a fresh token (default `$CIRIS_HOME/.env`).
    env_file: str | None = Field(default=None, min_length=1)
    #: Written when the backend refuses the agent's token (default `.token_refresh_needed` in
    #: `$CIRIS_HOME`, else beside `env_file`, else in the data directory).
    refresh_signal_file: str | None = Field(default=None, min_length=1)

    @field_validator("api_key")
    @classmethod
    def _key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        # The shape of real keys: cbk_{env}_{base64url}. Anything else (spaces, line breaks) could
        # never authenticate and would fail on every request instead of at startup.
        if value is not None and not API_KEY_SHAPE.fullmatch(value.get_secret_value()):
            raise ValueError(
                "must be a CIRIS Billing API key (starts with cbk_, then letters, digits, - or _)"
            )
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("fallback_urls", "accepted_replay_secrets", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("fallback_urls")
    @classmethod
    def _fallbacks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_base_url(v) for v in value)

    @model_validator(mode="after")
    def _budgets(self) -> CirisSettings:
        if self.connect_timeout_seconds > self.timeout_seconds:
            raise ValueError("connect_timeout_seconds cannot exceed timeout_seconds")
        if self.auth_mode == "api_key" and self.api_key is None:
            raise ValueError("api_key is required unless auth_mode is id_token")
        return self

    @property
    def id_token_mode(self) -> bool:
        return self.auth_mode == "id_token"

    @property
    def replay_secrets(self) -> tuple[str, ...]:
        """The secrets of purchase replies: the first seals, each opens (tried in order). Without a
        replay secret or an API key (ID-token mode sells nothing), none."""
        sealing = self.replay_secret or self.api_key
        if sealing is None:
            return ()
        found = [sealing, self.api_key, *self.accepted_replay_secrets]
        secrets = [s.get_secret_value() for s in found if s is not None]
        return tuple(dict.fromkeys(secrets))

    @property
    def base_urls(self) -> tuple[str, ...]:
        return (self.api_url, *(u for u in self.fallback_urls if u != self.api_url))

    @classmethod
    def from_context(cls, context: ProviderContext) -> CirisSettings:
        """Options over `CIRIS_BILLING_*` variables (see `ENV_VARS`); the key is required unless
        `auth_mode` is `id_token`."""
        mode = context.options.get("auth_mode") or context.environ.get("CIRIS_BILLING_AUTH_MODE")
        has_key = context.options.get("api_key") or context.environ.get("CIRIS_BILLING_API_KEY")
        if not has_key and mode != "id_token":
            raise ConfigError(
                f"{context.provider} provider: CIRIS_BILLING_API_KEY is required "
                "(a CIRIS Billing API key, cbk_...), unless CIRIS_BILLING_AUTH_MODE is id_token"
            )
        return context.settings(cls, env=ENV_VARS)
