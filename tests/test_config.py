"""Configuration: typed defaults, environment variables, and clear startup errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciris_billing_proxy import BillingConfig, ConfigError

from . import default_paths
from .conftest import SECRET


def test_defaults() -> None:
    config = BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET})
    assert config.prefix == "/v1/api/billing"
    assert config.provider == "simple"
    assert config.cache_ttl_seconds == 15
    assert config.jwt.algorithms == ("HS256",)
    assert config.gate_bypass_roles == frozenset()
    assert config.data_dir == Path.home() / ".ciris-billing-proxy"


def test_the_default_paths_are_the_ones_clients_call() -> None:
    # The tests build their paths from the package's constants; this pins those to the contract
    # (docs/billing-api.md), so a changed constant fails here rather than moving every test with it.
    billing = (
        default_paths.CAPABILITIES,
        default_paths.CREDITS,
        default_paths.INITIATE,
        default_paths.STATUS,
        default_paths.TRANSACTIONS,
    )
    assert billing == (
        "/v1/api/billing/capabilities",
        "/v1/api/billing/credits",
        "/v1/api/billing/purchase/initiate",
        "/v1/api/billing/purchase/status/",
        "/v1/api/billing/transactions",
    )
    auth = (default_paths.LOGIN, default_paths.LOGOUT, default_paths.REFRESH, default_paths.ME)
    assert auth == ("/v1/auth/login", "/v1/auth/logout", "/v1/auth/refresh", "/v1/auth/me")


def test_every_variable_is_read(tmp_path: Path) -> None:
    env = {
        "CIRIS_JWT_SECRET": SECRET,
        "CIRIS_JWT_ALGORITHMS": "HS512",
        "CIRIS_JWT_ISSUER": "https://id.example",
        "CIRIS_JWT_AUDIENCE": "agent",
        "CIRIS_JWT_LEEWAY_SECONDS": "2.5",
        "CIRIS_TOKEN_TTL_SECONDS": "600",
        "CIRIS_BILLING_PREFIX": "/api/billing/",
        "CIRIS_CREDIT_PROVIDER": "ciris",
        "CIRIS_BILLING_DATA_DIR": str(tmp_path),
        "CIRIS_AGENT_ID": "datum",
        "CIRIS_IDENTITY_NAMESPACE": "corp",
        "CIRIS_DEFAULT_ROLE": "USER",
        "CIRIS_CREDIT_CACHE_TTL_SECONDS": "5",
        "CIRIS_CREDIT_CACHE_MAX_ENTRIES": "50",
        "CIRIS_MAX_BODY_BYTES": "4096",
        "CIRIS_GATE_BYPASS_ROLES": "ADMIN, SYSTEM_ADMIN",
        "CIRIS_PROTECTED_PATHS": "/v1/agent,/v1/memory",
    }
    config = BillingConfig.from_env(env)
    assert config.jwt.algorithms == ("HS512",)
    assert (config.jwt.issuer, config.jwt.audience) == ("https://id.example", "agent")
    assert (config.jwt.leeway_seconds, config.jwt.token_ttl_seconds) == (2.5, 600)
    assert config.prefix == "/api/billing"
    assert config.provider == "ciris"
    assert config.data_dir == tmp_path
    assert (config.agent_id, config.identity_namespace, config.default_role) == ("datum", "corp", "USER")
    assert (config.cache_ttl_seconds, config.cache_max_entries, config.max_body_bytes) == (5, 50, 4096)
    assert config.gate_bypass_roles == {"ADMIN", "SYSTEM_ADMIN"}
    assert config.protected_paths == ("/v1/agent", "/v1/memory")


def test_public_key_may_be_a_file(tmp_path: Path) -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n"
    (tmp_path / "key.pem").write_text(pem)
    config = BillingConfig.from_env(
        {"CIRIS_JWT_PUBLIC_KEY": str(tmp_path / "key.pem"), "CIRIS_JWT_ALGORITHMS": "RS256"}
    )
    assert config.jwt.public_key == pem


def test_keyword_overrides_win_over_environment() -> None:
    config = BillingConfig.from_env(
        {"CIRIS_JWT_SECRET": SECRET, "CIRIS_CREDIT_PROVIDER": "ciris"}, provider="simple"
    )
    assert config.provider == "simple"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({}, "CIRIS_JWT_SECRET is not set"),
        ({"CIRIS_JWT_SECRET": "tooshort"}, "at least 32 bytes"),
        ({"CIRIS_JWT_SECRET": SECRET, "CIRIS_CREDIT_CACHE_TTL_SECONDS": "soon"}, "cache_ttl_seconds"),
        ({"CIRIS_JWT_SECRET": SECRET, "CIRIS_BILLING_PREFIX": "no-slash"}, "prefix"),
        ({"CIRIS_JWT_SECRET": SECRET, "CIRIS_AGENT_ID": "has space"}, "agent_id"),
    ],
)
def test_bad_environment_fails_clearly_without_echoing_values(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        BillingConfig.from_env(env)
    assert "tooshort" not in str(info.value)


def test_secrets_do_not_show_in_repr() -> None:
    config = BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET})
    assert SECRET not in repr(config)
    assert SECRET not in str(config.model_dump())
