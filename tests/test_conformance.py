"""The built-in providers keep the provider contract, checked by the conformance kit itself."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ciris_billing_proxy import (
    AppStorePurchase,
    BillingConfig,
    GooglePlayPurchase,
    Identity,
    ProviderContext,
)
from ciris_billing_proxy.ledger import Account
from ciris_billing_proxy.providers.ciris import CirisProvider
from ciris_billing_proxy.providers.simple import ProductSettings, SimpleProvider, SimpleSettings
from ciris_billing_proxy.providers.stripe import StripeProvider
from ciris_billing_proxy.testing import FakeBillingBackend
from ciris_billing_proxy.testing.conformance import ProviderContract
from ciris_billing_proxy.testing.fake_stripe_api import FakeStripeAPI

from .repo_files import code_after


class TestSimpleConforms(ProviderContract):
    @pytest.fixture
    async def provider(self) -> AsyncIterator[SimpleProvider]:
        provider = SimpleProvider(database=":memory:")
        await provider.start()
        yield provider
        await provider.stop()


class TestSimpleWithProductsConforms(ProviderContract):
    @pytest.fixture
    async def provider(self) -> AsyncIterator[SimpleProvider]:
        products = {"web_search": ProductSettings(free_uses=6), "image_gen": ProductSettings(free_uses=2)}
        provider = SimpleProvider(SimpleSettings(products=products), database=":memory:")
        await provider.start()
        yield provider
        await provider.stop()


class TestCirisConforms(ProviderContract):
    # The backend cannot give back a free use: give-backs are checked on paid credit.
    returns_free_uses = False
    # Nor a tool use at all.
    returns_product_uses = False

    @pytest.fixture
    async def provider(
        self, ciris_billing_config: BillingConfig, ciris_fake_backend: FakeBillingBackend
    ) -> AsyncIterator[CirisProvider]:
        self.fake, config = ciris_fake_backend, ciris_billing_config
        self.agent_id = config.agent_id
        context = ProviderContext(config.provider_options, data_dir=config.data_dir, agent_id=config.agent_id)
        provider = CirisProvider.from_context(context)
        await provider.start()
        yield provider
        await provider.stop()

    async def add_paid_credit(self, provider: CirisProvider, identity: Identity, uses: int) -> None:
        # The backend account of the user (see "The ciris provider": `local` users carry the agent id).
        local = identity.namespace == "local"
        external_id = f"{self.agent_id}:{identity.user_id}" if local else identity.user_id
        self.fake.grant(f"oauth:{identity.namespace}", external_id, uses)

    async def complete_payment(self, provider: CirisProvider, payment_id: str) -> None:
        self.fake.confirm_payment(payment_id)  # Stripe says succeeded, and the webhook credits at once

    async def google_play_purchase(self, provider: CirisProvider) -> GooglePlayPurchase:
        # Any fresh token the fake backend's Google Play accepts (see "Fake store tokens").
        return GooglePlayPurchase(
            purchase_token=f"gp-{uuid.uuid4().hex}", product_id="credits_100", package_name="ai.ciris.mobile"
        )

    async def app_store_purchase(self, provider: CirisProvider) -> AppStorePurchase:
        return AppStorePurchase(
            transaction_id=f"2000{uuid.uuid4().int % 10**12:012d}",
            product_id="ai.ciris.mobile.credits_250_v1",
        )


class TestStripeConforms(ProviderContract):
    """The `stripe` provider against the fake Stripe API, without webhooks: a paid purchase is
    credited by the kit's status polls (the provider asks Stripe)."""

    @pytest.fixture
    async def provider(self, tmp_path: Path) -> AsyncIterator[StripeProvider]:
        self.fake = FakeStripeAPI()
        await self.fake.start()
        options = {
            "secret_key": self.fake.secret_key,
            "publishable_key": self.fake.publishable_key,
            "api_base": self.fake.url,
            "database": ":memory:",
            "free_uses": 3,
        }
        provider = StripeProvider.from_context(ProviderContext(options, data_dir=tmp_path))
        await provider.start()
        yield provider
        await provider.stop()
        await self.fake.stop()

    async def add_paid_credit(self, provider: StripeProvider, identity: Identity, uses: int) -> None:
        account = Account(identity.namespace, identity.user_id)
        await provider.ledger.grant(account, uses, "paid", source="admin", reason="goodwill")

    async def complete_payment(self, provider: StripeProvider, payment_id: str) -> None:
        self.fake.state.confirm(payment_id, "pm_card_visa")


ROOT = Path(__file__).resolve().parents[1]
KIT_CHECKS = sorted(name for name in dir(ProviderContract) if name.startswith("test_"))
#: The checks of per-product credits: they skip for a provider that sells no product.
#: The checks of weighted spends and the ledger: they skip for a provider without them.
LEDGER_CHECKS = [
    name for name in KIT_CHECKS if "weighted" in name or "reservation" in name or "ledger" in name
]
PRODUCT_CHECKS = [name for name in KIT_CHECKS if name.startswith("test_product_")]
INI = """[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
filterwarnings = error
"""
KIT_RUN = """
import pytest

import conformance_providers
from ciris_billing_proxy.testing.conformance import ProviderContract


class Test{name}(ProviderContract):
    settle_seconds = 0.5

    @pytest.fixture
    async def provider(self):
        provider = conformance_providers.{name}()
        await provider.start()
        yield provider
        await provider.stop()

    async def add_paid_credit(self, provider, identity, uses):
        provider.grant(identity, uses)

    async def complete_payment(self, provider, payment_id):
        provider.pay(payment_id)

    async def google_play_purchase(self, provider):
        return conformance_providers.play_purchase()

    async def app_store_purchase(self, provider):
        return conformance_providers.store_purchase()
"""


def run_kit(pytester: pytest.Pytester, name: str) -> pytest.RunResult:
    """Run the kit against one provider of tests/conformance_providers.py, as an author's suite would."""
    pytester.makeini(INI)
    source = (Path(__file__).parent / "conformance_providers.py").read_text(encoding="utf-8")
    pytester.makepyfile(conformance_providers=source, test_kit=KIT_RUN.format(name=name))
    return pytester.runpytest("-p", "no:cacheprovider")


def test_a_correct_provider_that_sells_passes_every_check(pytester: pytest.Pytester) -> None:
    result = run_kit(pytester, "Reference")
    # Skipped: the check for providers that do not sell, the two of providers that redeem app store
    # purchases, the one of providers that charge nothing, and the product checks.
    result.assert_outcomes(
        passed=len(KIT_CHECKS) - 4 - len(PRODUCT_CHECKS) - len(LEDGER_CHECKS),
        skipped=4 + len(PRODUCT_CHECKS) + len(LEDGER_CHECKS),
    )


def test_a_correct_provider_that_redeems_store_purchases_passes_every_check(
    pytester: pytest.Pytester,
) -> None:
    result = run_kit(pytester, "StoreReference")
    # Skipped: the checks of providers that do not sell, of stores a provider does not declare, and
    # of providers that charge nothing, and the product checks.
    result.assert_outcomes(
        passed=len(KIT_CHECKS) - 3 - len(PRODUCT_CHECKS) - len(LEDGER_CHECKS),
        skipped=3 + len(PRODUCT_CHECKS) + len(LEDGER_CHECKS),
    )


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("GivesBackOnEveryCall", "a second give_back under the same key must change nothing, but"),
        ("GivesBackOnEveryCall", "give_back for a key that was never spent must change nothing, but"),
        ("SpendIgnoresKeys", "spend twice with the same idempotency key must take one use, but it took 2."),
        ("StatusAsDict", "credit_status must return a CreditStatus, but it returned dict."),
        (
            "SyncSpend",
            "CreditProvider.spend must be a coroutine function (async def), but SyncSpend.spend is not.",
        ),
        ("SyncSpend", "spend must be a coroutine function (async def), but calling it returned NoneType."),
        ("ConstructedStatus", "credit_status has_credit must be true exactly when"),
        ("RacySpend", "concurrent spends with distinct keys must never take more than the user had (3)"),
        ("KeysSharedAcrossUsers", "idempotency keys are per user: a spend by another user"),
        ("PaymentsVisibleToAll", "a payment must be visible to its owner only"),
        ("CreditsOnEveryStatus", "a completed payment must add exactly its uses (10) once, but"),
        ("IgnoresLimit", "transactions must return at most limit (1) items, but it returned"),
        ("UnsendableMetadata", "metadata must be plain JSON"),
        ("LeaksTask", "stop after a restart must leave no task of the provider running, but 1 started"),
        ("StoreCreditsEveryTime", "verify_google_play must redeem one purchase exactly once: of 6 identical"),
        ("StoreCreditsEveryTime", "verify_app_store must redeem one purchase exactly once"),
        (
            "StoreWithoutDeclaring",
            "verify_google_play must raise BillingDisabled when google_play_enabled is",
        ),
    ],
)
def test_a_broken_provider_fails_with_the_rule_it_broke(
    pytester: pytest.Pytester, name: str, rule: str
) -> None:
    result = run_kit(pytester, name)
    assert result.parseoutcomes().get("failed", 0) >= 1
    assert rule in result.stdout.str()


EXAMPLE = ROOT / "examples" / "provider_plugin"
EXAMPLE_TEST = EXAMPLE / "tests" / "test_conformance.py"


def test_the_example_distribution_passes_the_kit_with_its_pytest_config(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))
    pytester.syspathinsert(EXAMPLE)
    pytester.makepyfile(test_conformance=EXAMPLE_TEST.read_text(encoding="utf-8"))
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error")
    # Skipped: paid give-backs (no add_paid_credit hook), the three checks of providers that sell and
    # the two of providers that redeem app store purchases, the one of providers that charge nothing,
    # and the product checks.
    result.assert_outcomes(
        passed=len(KIT_CHECKS) - 7 - len(PRODUCT_CHECKS) - len(LEDGER_CHECKS),
        skipped=7 + len(PRODUCT_CHECKS) + len(LEDGER_CHECKS),
    )


def test_the_readme_shows_the_example_distributions_test_and_this_repositorys_ciris_test() -> None:
    assert code_after("conformance") == EXAMPLE_TEST.read_text(encoding="utf-8")
    assert code_after("conformance-ciris") in Path(__file__).read_text(encoding="utf-8")
