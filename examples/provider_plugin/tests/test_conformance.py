"""The provider keeps the contract of `CreditProvider`, checked by ciris-billing-proxy's conformance kit."""

import pytest
from acme_daily_quota import DailyQuotaProvider

from ciris_billing_proxy.testing.conformance import ProviderContract


class TestDailyQuotaConforms(ProviderContract):
    # give_back returns the quota use its spend took (the default, stated for the reader).
    returns_free_uses = True

    @pytest.fixture
    async def provider(self):
        provider = DailyQuotaProvider(per_day=5)
        await provider.start()
        yield provider
        await provider.stop()
