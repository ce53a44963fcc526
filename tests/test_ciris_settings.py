"""Settings of the `ciris` provider: required key, URL rules, clear startup errors."""

from __future__ import annotations

import pytest

from ciris_billing_proxy import ConfigError, ProviderContext
from ciris_billing_proxy.providers.ciris import CirisSettings

KEY = "cbk_test_" + "k" * 43


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({}, "CIRIS_BILLING_API_KEY is required"),
        ({"api_key": "sk_live_x"}, "starts with cbk_"),
        ({"api_key": "cbk_test_a b"}, "cbk_"),
        ({"api_key": "cbk_test_\r\nX-Evil: 1"}, "cbk_"),
        ({"api_key": KEY, "api_url": "http://billing.example.com"}, "must use https"),
        ({"api_key": KEY, "api_url": "https://user:pw@billing.example.com"}, "credentials"),
        ({"api_key": KEY, "api_url": "billing.ciris.ai"}, "absolute URL"),
        ({"api_key": KEY, "fallback_urls": "https://ok.example, http://10.0.0.1"}, "must use https"),
        ({"api_key": KEY, "timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_bad_settings_fail_at_startup(options: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=f"^ciris provider: .*{words}") as info:
        CirisSettings.from_context(ProviderContext(options=options, provider="ciris"))
    assert "sk_live_x" not in str(info.value)


def test_loopback_may_use_http_and_env_is_read() -> None:
    env = {
        "CIRIS_BILLING_API_KEY": KEY,
        "CIRIS_BILLING_API_URL": "http://127.0.0.1:9000/",
        "CIRIS_BILLING_FALLBACK_URLS": "http://[::1]:9001,http://localhost:9002",
        "STRIPE_PUBLISHABLE_KEY": "pk_test_1",
        "CIRIS_BILLING_TIMEOUT_SECONDS": "4",
    }
    settings = CirisSettings.from_context(ProviderContext(environ=env))
    assert settings.base_urls == ("http://127.0.0.1:9000", "http://[::1]:9001", "http://localhost:9002")
    assert (settings.stripe_publishable_key, settings.timeout_seconds) == ("pk_test_1", 4)
    assert KEY not in repr(settings)
