"""The `stripe` provider's settings: both keys required, packs as JSON, every bad value one
`ConfigError` naming the setting and never echoing it (settings carry secrets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciris_billing_proxy import ConfigError, ProviderContext
from ciris_billing_proxy.providers.stripe import StripeProvider, StripeSettings

KEYS = {"CIRIS_STRIPE_SECRET_KEY": "sk_test_abc123", "CIRIS_STRIPE_PUBLISHABLE_KEY": "pk_test_abc123"}


def settings(environ: dict[str, str], **options: object) -> StripeSettings:
    return StripeSettings.from_context(ProviderContext(options, environ, provider="stripe"))


def test_the_environment_gives_keys_packs_and_free_uses() -> None:
    found = settings(
        {
            **KEYS,
            "CIRIS_STRIPE_WEBHOOK_SECRET": "whsec_abc",
            "CIRIS_STRIPE_PACKS": '[{"id": "a", "uses": 5, "price_minor": 100, "currency": "eur"}]',
            "CIRIS_STRIPE_FREE_USES": "3",
            "CIRIS_STRIPE_API_BASE": "http://127.0.0.1:9999/",
        }
    )
    assert [(p.id, p.uses, p.price_minor, p.currency) for p in found.packs] == [("a", 5, 100, "EUR")]
    assert (found.free_uses, found.api_base) == (3, "http://127.0.0.1:9999")
    assert found.webhook_secret is not None
    assert "whsec_abc" not in repr(found)
    assert "sk_test_abc123" not in repr(found)
    defaults = settings(KEYS)
    assert (defaults.free_uses, defaults.webhook_secret, [p.id for p in defaults.packs]) == (
        0,
        None,
        ["default"],
    )


@pytest.mark.parametrize("missing", list(KEYS))
def test_each_key_is_required(missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        settings({k: v for k, v in KEYS.items() if k != missing})


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("CIRIS_STRIPE_SECRET_KEY", "sk_nope_secretvalue", "secret_key"),
        ("CIRIS_STRIPE_PUBLISHABLE_KEY", "secretvalue", "publishable_key"),
        ("CIRIS_STRIPE_WEBHOOK_SECRET", "secretvalue", "webhook_secret"),
        ("CIRIS_STRIPE_PACKS", "secretvalue", "packs"),
        ("CIRIS_STRIPE_PACKS", "[]", "packs"),
        ("CIRIS_STRIPE_PACKS", '[{"id": "a", "uses": 0, "price_minor": 1, "currency": "usd"}]', "packs"),
        (
            "CIRIS_STRIPE_PACKS",
            '[{"id": "a", "uses": 1, "price_minor": 1, "currency": "usd"},'
            ' {"id": "a", "uses": 2, "price_minor": 2, "currency": "usd"}]',
            "packs",
        ),
        ("CIRIS_STRIPE_FREE_USES", "-1", "free_uses"),
        ("CIRIS_STRIPE_API_BASE", "http://api.example.com/secretvalue", "api_base"),
    ],
)
def test_a_bad_value_names_its_setting_and_never_shows_it(variable: str, value: str, field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        settings({**KEYS, variable: value})
    assert field in str(refused.value)
    assert "secretvalue" not in str(refused.value)


def test_the_provider_is_built_from_its_context(tmp_path: Path) -> None:
    provider = StripeProvider.from_context(
        ProviderContext({"database": ":memory:"}, KEYS, data_dir=tmp_path, provider="stripe")
    )
    assert provider.purchases_enabled
    assert [p.id for p in provider.packs] == ["default"]
    assert [route.operation.path for route in provider.routes()] == ["/stripe/webhook"]
