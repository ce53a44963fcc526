"""One typed settings object for the billing proxy, buildable from keyword arguments or the environment.

Constructing `BillingConfig(...)` in Python never reads the environment; only `BillingConfig.from_env()`
does. Hosts that build their config in code get exactly what they wrote, and tests are not at the
mercy of whatever variables the machine happens to have set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .database_budget import DatabaseBudget
from .database_url import parse_database_url
from .paths import DEFAULT_PREFIX, DEFAULT_TOOLS_PREFIX

#: A serialized web origin as browsers send it in `Origin` (RFC 6454 section 6.1).
ORIGIN: Final = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.\-]+)(:[0-9]{1,5})?")
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def default_data_dir() -> Path:
    return Path.home() / ".ciris-billing-proxy"


class ConfigError(ValueError):
    """Configuration that cannot work; raised at startup, never on a request."""


class JWTConfig(BaseModel):
    """How bearer tokens are verified (and, for the optional login route, issued)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: HMAC secret: at least 32 bytes for HS256 (48 for HS384, 64 for HS512).
    secret: SecretStr | None = None
    #: PEM text, or a path to a PEM file, for RS*/PS*/ES*/EdDSA.
    public_key: str | None = None
    #: PEM text or path; only to let the login route sign RS*/ES* tokens.
    private_key: SecretStr | None = None
    #: Allow-list (comma-separated in the environment): all HMAC or all public-key, never mixed,
    #: never `none`; the key must fit (and be long enough for) every one, checked at startup.
    algorithms: tuple[str, ...] = ("HS256",)
    #: The `iss` every token must carry, when set.
    issuer: str | None = None
    #: The `aud` every token must carry, when set.
    audience: str | None = None
    #: Clock-skew allowance for `exp`, `nbf` and `iat`.
    leeway_seconds: float = Field(default=10.0, ge=0, le=300)
    #: Lifetime of the tokens the login route issues.
    token_ttl_seconds: int = Field(default=3600, ge=60, le=30 * 24 * 3600)

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one JWT algorithm is required")
        unknown = [a for a in value if a not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS]
        if unknown:
            raise ValueError(f"unsupported JWT algorithm(s): {', '.join(unknown)}")
        return value

    @model_validator(mode="after")
    def _one_key_family(self) -> Self:
        # Mixing HMAC and public-key algorithms is what makes key-confusion attacks possible:
        # a verifier holding a public key must never accept HS* tokens "signed" with it.
        hmac = set(self.algorithms) & HMAC_ALGORITHMS
        asym = set(self.algorithms) & ASYMMETRIC_ALGORITHMS
        if hmac and asym:
            raise ValueError("JWT algorithms must be all HMAC (HS*) or all public-key, not mixed")
        if hmac:
            # RFC 7518 3.2: an HMAC key at least as long as the hash output (32/48/64 bytes).
            needed = max(int(a[2:]) // 8 for a in hmac)
            if self.secret is None or len(self.secret.get_secret_value().encode()) < needed:
                raise ValueError(
                    f"the JWT secret must be at least {needed} bytes for {', '.join(sorted(hmac))}"
                )
            if self.public_key is not None:
                raise ValueError("a JWT public key is set but the algorithms are HMAC (HS*)")
        if asym and not self.public_key:
            raise ValueError("public-key JWT algorithms need a public key (PEM)")
        return self

    @property
    def uses_hmac(self) -> bool:
        return self.algorithms[0] in HMAC_ALGORITHMS

    @property
    def can_issue(self) -> bool:
        return self.uses_hmac or self.private_key is not None


class BillingConfig(BaseModel):
    """Everything `setup_billing` needs; `from_env` reads the variables listed in `ENV_VARS`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    jwt: JWTConfig
    #: Where the billing routes live.
    prefix: str = DEFAULT_PREFIX
    #: Credit provider name in the `ciris_billing_proxy.providers` entry-point group (`simple`,
    #: `ciris`, `unlimited`, or a third party's).
    provider: str = "simple"
    #: The provider's own settings, given in code; they win over its environment variables.
    provider_options: dict[str, Any] = Field(default_factory=dict)
    #: Where providers (and the demo) keep state: SQLite files, the demo's users and JWT secret.
    data_dir: Path = Field(default_factory=default_data_dir)
    #: Where the providers keep their records: unset for SQLite files in `data_dir`, `sqlite:///path`
    #: for one SQLite file, `postgresql://user@host:port/dbname` for PostgreSQL (shared by every
    #: process and host pointed at it). Secret: it may carry a password.
    database_url: SecretStr | None = None
    #: Connections each pool of this process may hold on PostgreSQL (the records, the change feed's
    #: up to 2, the login throttle's and the give-back outbox's pools each take at most this many).
    database_pool_size: int = Field(default=10, ge=1, le=100)
    #: Longest one use of the database may take in all (waiting for a connection or a lock, and every
    #: statement of it); past that the request is answered 503. See docs/operations.md.
    database_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    #: This agent's name; namespaces the keys it sends to a shared billing backend. Set it once and
    #: keep it.
    agent_id: str = Field(default="agent", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    #: Identity namespace of tokens without an `oauth_provider` claim.
    identity_namespace: str = Field(default="local", min_length=1, max_length=64)
    #: Role of tokens without a `role` claim.
    default_role: str = Field(default="OBSERVER", min_length=1, max_length=50)
    #: How long a user's credit status is cached.
    cache_ttl_seconds: float = Field(default=15.0, gt=0, le=3600)
    #: Cache lifetime of a "no credit" status: shorter, so credit that arrives by another path (an
    #: app-store purchase, a grant) shows sooner.
    negative_cache_ttl_seconds: float = Field(default=5.0, gt=0, le=3600)
    #: Bound of the credit cache (least recently used go first).
    cache_max_entries: int = Field(default=100_000, ge=1)
    #: Verified tokens kept (0 turns the cache off); see `auth.TokenVerifier`.
    token_cache_max_entries: int = Field(default=100_000, ge=0)
    #: Largest request body accepted by the routes of this package.
    max_body_bytes: int = Field(default=16 * 1024, ge=256, le=1024 * 1024)
    #: Seconds a request body may take to arrive in full, on every route of this package that
    #: reads one; a slower body is answered 408 and its connection closed.
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Longest wait between retries of a give-back the provider could not do (its backend was
    #: down): once it is back, a failed interaction's use is back within this many seconds.
    give_back_retry_max_seconds: float = Field(default=10.0, gt=0, le=300)
    #: Roles the credit gate does not charge (case-insensitive).
    gate_bypass_roles: frozenset[str] = frozenset()
    #: Roles that may use the admin routes (`{prefix}/admin/...`: grant, correct, audit credit;
    #: case-insensitive). Every other role gets 403 there.
    admin_roles: frozenset[str] = frozenset({"ADMIN"})
    #: A spend that takes a user's balance from above this to at or below it writes one
    #: `balance.low` event (once per crossing); None: no such event. Ledger providers only.
    low_balance_threshold: int | None = Field(default=None, ge=0, le=1_000_000_000)
    #: Host path prefixes that also require a token (each covers itself and everything below it).
    protected_paths: tuple[str, ...] = ()
    #: Failed logins that lock a username, and a client address, for the rest of the window (0: no
    #: limit); see `throttle.MemoryLoginThrottle`.
    login_max_failures_per_user: int = Field(default=5, ge=0, le=1_000_000)
    #: Failed logins that lock a client address (IPv6: a /64) until its window closes; 0: no limit.
    login_max_failures_per_address: int = Field(default=20, ge=0, le=1_000_000)
    #: How long a window of failed logins lasts, from its first failure.
    login_failure_window_seconds: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    #: New tokens one user may get (login and refresh together) per window, in each process (0: no
    #: limit); beyond it 429 with `Retry-After`. It bounds the revoked tokens kept (see
    #: `token_limit`).
    token_issue_max_per_user: int = Field(default=120, ge=0, le=1_000_000)
    #: The window of `token_issue_max_per_user`, in seconds.
    token_issue_window_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    #: Reverse proxies whose `X-Forwarded-For` is believed (addresses or CIDR networks); none by default.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    #: Serve the billing UI kit (`{prefix}/ui/billing.js`, `billing.d.ts`) without a token.
    serve_ui: bool = True
    #: Web origins (`https://shop.example`, `http://localhost:5173`) whose pages may call the billing
    #: routes from the browser (CORS); `*` allows every origin. None by default: same origin only.
    cors_origins: tuple[str, ...] = ()
    #: Where the tool routes (per-product credits) live, as the CIRIS agent serves them.
    tools_prefix: str = DEFAULT_TOOLS_PREFIX

    @field_validator("prefix", "tools_prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith("/") or "//" in value or " " in value:
            raise ValueError("must be an absolute URL path such as /v1/api/billing")
        return value

    @model_validator(mode="after")
    def _apart(self) -> Self:
        inner, outer = sorted((self.prefix, self.tools_prefix), key=len, reverse=True)
        if inner == outer or inner.startswith(outer + "/"):
            raise ValueError("prefix and tools_prefix must not be the same or one inside the other")
        return self

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_database_url(value.get_secret_value())
        return value

    @property
    def database_budget(self) -> DatabaseBudget:
        return DatabaseBudget(self.database_pool_size, self.database_timeout_seconds)

    @field_validator("gate_bypass_roles", "admin_roles")
    @classmethod
    def _upper_roles(cls, value: frozenset[str]) -> frozenset[str]:
        return frozenset(
            role.strip().upper() for role in value if role.strip()
        )  # token roles are upper-cased

    @field_validator("protected_paths")
    @classmethod
    def _clean_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"protected path {path!r} must start with '/'")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Browsers send `Origin` as scheme://host[:port], lower-case, without a path or a trailing
        # slash, and CORS compares it as a string: anything else would never match.
        for origin in value:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not a web origin: write scheme://host[:port] in lower case, without a "
                    "path or trailing slash (e.g. https://shop.example), or * for any origin"
                )
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        try:
            return tuple(ip_network(item) if isinstance(item, str) else item for item in items)
        except ValueError as exc:  # e.g. "10.0.0.1/8 has host bits set"
            raise ValueError(str(exc)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> BillingConfig:
        """Build a config from `CIRIS_*` variables; keyword overrides win over the environment."""
        env = os.environ if environ is None else environ
        top: dict[str, Any] = {}
        jwt: dict[str, Any] = {}
        for var, (section, field, kind) in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            target = jwt if section == "jwt" else top
            target[field] = _LIST_PARSERS[kind](raw) if kind in _LIST_PARSERS else raw
        for name in ("public_key", "private_key"):
            if name in jwt and not jwt[name].lstrip().startswith("-----BEGIN"):
                jwt[name] = _read_key_file(name, jwt[name])
        if "jwt" in overrides:
            override = overrides.pop("jwt")
            jwt.update(override.model_dump() if isinstance(override, JWTConfig) else override)
        top.update(overrides)
        if jwt.get("secret") is None and jwt.get("public_key") is None:
            # Said plainly: "must be at least 32 bytes" would send someone who never set it hunting.
            raise ConfigError(
                "CIRIS_JWT_SECRET is not set: set it to a random string of at least 32 bytes, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))' "
                "(or CIRIS_JWT_PUBLIC_KEY for RS256/ES256)"
            )
        try:
            return cls.model_validate({**top, "jwt": jwt})
        except ValueError as exc:
            raise ConfigError(describe_validation_error(exc)) from None


def _read_key_file(name: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Invalid configuration: jwt.{name}: cannot read {path}: {exc.strerror}") from None


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


_LIST_PARSERS = {"list": _split}

#: Environment variable -> (section, field, kind). The configuration reference of the docs site is
#: generated from these and the fields' `#:` comments (tests/test_docs_site.py).
ENV_VARS: Final[dict[str, tuple[str, str, str]]] = {
    "CIRIS_JWT_SECRET": ("jwt", "secret", "str"),
    "CIRIS_JWT_PUBLIC_KEY": ("jwt", "public_key", "str"),
    "CIRIS_JWT_PRIVATE_KEY": ("jwt", "private_key", "str"),
    "CIRIS_JWT_ALGORITHMS": ("jwt", "algorithms", "list"),
    "CIRIS_JWT_ISSUER": ("jwt", "issuer", "str"),
    "CIRIS_JWT_AUDIENCE": ("jwt", "audience", "str"),
    "CIRIS_JWT_LEEWAY_SECONDS": ("jwt", "leeway_seconds", "float"),
    "CIRIS_TOKEN_TTL_SECONDS": ("jwt", "token_ttl_seconds", "int"),
    "CIRIS_BILLING_PREFIX": ("top", "prefix", "str"),
    "CIRIS_CREDIT_PROVIDER": ("top", "provider", "str"),
    "CIRIS_BILLING_DATA_DIR": ("top", "data_dir", "path"),
    "CIRIS_BILLING_DATABASE_URL": ("top", "database_url", "str"),
    "CIRIS_BILLING_DATABASE_POOL_SIZE": ("top", "database_pool_size", "int"),
    "CIRIS_BILLING_DATABASE_TIMEOUT_SECONDS": ("top", "database_timeout_seconds", "float"),
    "CIRIS_AGENT_ID": ("top", "agent_id", "str"),
    "CIRIS_IDENTITY_NAMESPACE": ("top", "identity_namespace", "str"),
    "CIRIS_DEFAULT_ROLE": ("top", "default_role", "str"),
    "CIRIS_CREDIT_CACHE_TTL_SECONDS": ("top", "cache_ttl_seconds", "float"),
    "CIRIS_CREDIT_CACHE_NEGATIVE_TTL_SECONDS": ("top", "negative_cache_ttl_seconds", "float"),
    "CIRIS_CREDIT_CACHE_MAX_ENTRIES": ("top", "cache_max_entries", "int"),
    "CIRIS_TOKEN_CACHE_MAX_ENTRIES": ("top", "token_cache_max_entries", "int"),
    "CIRIS_MAX_BODY_BYTES": ("top", "max_body_bytes", "int"),
    "CIRIS_BODY_TIMEOUT_SECONDS": ("top", "body_timeout_seconds", "float"),
    "CIRIS_GIVE_BACK_RETRY_MAX_SECONDS": ("top", "give_back_retry_max_seconds", "float"),
    "CIRIS_GATE_BYPASS_ROLES": ("top", "gate_bypass_roles", "list"),
    "CIRIS_BILLING_ADMIN_ROLES": ("top", "admin_roles", "list"),
    "CIRIS_BILLING_LOW_BALANCE_THRESHOLD": ("top", "low_balance_threshold", "int"),
    "CIRIS_PROTECTED_PATHS": ("top", "protected_paths", "list"),
    "CIRIS_LOGIN_MAX_FAILURES_PER_USER": ("top", "login_max_failures_per_user", "int"),
    "CIRIS_LOGIN_MAX_FAILURES_PER_ADDRESS": ("top", "login_max_failures_per_address", "int"),
    "CIRIS_LOGIN_FAILURE_WINDOW_SECONDS": ("top", "login_failure_window_seconds", "int"),
    "CIRIS_TOKEN_ISSUE_MAX_PER_USER": ("top", "token_issue_max_per_user", "int"),
    "CIRIS_TOKEN_ISSUE_WINDOW_SECONDS": ("top", "token_issue_window_seconds", "int"),
    "CIRIS_TRUSTED_PROXIES": ("top", "trusted_proxies", "list"),
    "CIRIS_BILLING_SERVE_UI": ("top", "serve_ui", "bool"),
    "CIRIS_BILLING_CORS_ORIGINS": ("top", "cors_origins", "list"),
    "CIRIS_TOOLS_PREFIX": ("top", "tools_prefix", "str"),
}


def describe_validation_error(exc: ValueError) -> str:
    """A one-paragraph message naming each bad field, without echoing secret input values."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return f"Invalid configuration: {exc}"
    parts = []
    for err in errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "Invalid configuration: " + "; ".join(parts)
