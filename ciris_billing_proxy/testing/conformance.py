"""The provider conformance kit: a pytest test class that tells a provider author whether their
credit provider keeps the contract of `CreditProvider`.

Subclass `ProviderContract` in a class whose name starts with `Test` and give it an async fixture
`provider` that yields a started provider and stops it afterwards; every check below then runs as a
test of that class. Each check uses fresh users (uuid-based ids), so one provider instance, even a
persistent one, can serve them all. A failing check says the rule it broke in one sentence.

What the kit cannot do generically is left to optional hooks (`add_paid_credit`,
`complete_payment`, `google_play_purchase`, `app_store_purchase`): a check that needs a hook the
subclass does not implement is skipped, with a reason naming the hook. What a provider may
legitimately do differently is declared in class attributes (`returns_free_uses`, ...) or by the
provider itself (`purchases_enabled`, `google_play_enabled`, ...), never inferred, so no check is
weakened silently.

The async checks need pytest-asyncio in auto mode (`asyncio_mode = "auto"`), which pytest-aiohttp
also uses. This module imports pytest, so it is for test suites only; nothing at runtime imports it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import pytest
from pydantic import BaseModel, ValidationError

from .. import (
    AppStorePurchase,
    BillingDisabled,
    BillingError,
    CreditProvider,
    CreditStatus,
    GooglePlayPurchase,
    Identity,
    InsufficientCredit,
    PaymentNotFound,
    ProviderUnavailable,
    PurchaseInitiated,
    PurchaseStatus,
    StoreVerification,
)
from ..ledger import Account, Ledger, Overdrawn, Usage
from ..models import TransactionPage
from ..products import Product, ToolBalance

__all__ = ["ProviderContract"]

#: The provider's methods the proxy awaits.
ASYNC_METHODS = (
    "start",
    "stop",
    "credit_status",
    "spend",
    "give_back",
    "initiate_purchase",
    "purchase_status",
    "transactions",
    "verify_google_play",
    "verify_app_store",
    "health",
    "product_balance",
    "product_balances",
    "product_check",
    "spend_product",
    "give_back_product",
    "verify_product_purchase",
    "spend_weighted",
    "reserve",
    "settle",
    "record_usage",
)
#: What a provider declares it offers: each must be a bool.
DECLARATIONS = (
    "purchases_enabled",
    "keeps_transactions",
    "google_play_enabled",
    "apple_storekit_enabled",
    "gate_charges",
    "id_token_required",
    "product_purchases_enabled",
    "weighted_spends",
)
#: Store -> (its declaration, its method, the hook that makes a purchase to redeem).
STORES = {
    "google_play": ("google_play_enabled", "verify_google_play", "google_play_purchase"),
    "app_store": ("apple_storekit_enabled", "verify_app_store", "app_store_purchase"),
}
#: Identical verifications the kit sends at once: one may add credits, the others none.
CONCURRENT_VERIFIES = 5
FAILED_STATES = frozenset({"failed", "canceled"})
POLL_SECONDS = 0.05


def broken(rule: str) -> NoReturn:
    """Fail the check with its rule only: the traceback of the kit would say nothing more."""
    pytest.fail(rule, pytrace=False)


def returns_none(method: str, result: Any) -> None:
    if result is not None:
        broken(f"{method} must return None, but it returned {type(result).__name__}.")


def new_key() -> str:
    return uuid.uuid4().hex


def plain(value: Any) -> Any:
    """A model as plain data read from its attributes, so that an instance made with
    `model_construct`, or of a subclass that loosens the rules, is validated afresh."""
    if isinstance(value, BaseModel):
        return {name: plain(getattr(value, name, None)) for name in type(value).model_fields}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


@dataclass(frozen=True)
class Balance:
    """The counts of a `CreditStatus` the checks compare."""

    paid: int
    free: int
    total_uses: int

    @property
    def available(self) -> int:
        return self.paid + self.free

    def change_to(self, after: Balance) -> str:
        parts = [
            f"{name} went from {old} to {new}"
            for name, old, new in (
                ("credits_remaining", self.paid, after.paid),
                ("free_uses_remaining", self.free, after.free),
                ("total_uses", self.total_uses, after.total_uses),
            )
            if old != new
        ]
        return " and ".join(parts) or "nothing changed"


def check_credit_status(status: CreditStatus) -> Balance:
    """The consistency rules of `docs/compatibility.md`, each named, then the model's own."""
    data = plain(status)
    for name in ("credits_remaining", "free_uses_remaining", "total_uses"):
        value = data.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            broken(f"credit_status {name} must be an integer, but it was {value!r}.")
        if value < 0:
            broken(f"credit_status counts must never be negative, but {name} was {value}.")
    available = data["credits_remaining"] + data["free_uses_remaining"]
    if data.get("has_credit") is not (available > 0):
        broken(
            "credit_status has_credit must be true exactly when credits_remaining + free_uses_remaining"
            f" > 0, but has_credit was {data.get('has_credit')!r} with {available} available."
        )
    required, options = data.get("purchase_required"), data.get("purchase_options")
    if required is not (options is not None):
        broken(
            "credit_status must give purchase_options exactly when purchase_required is true, but"
            f" purchase_required was {required!r} and purchase_options was {'set' if options else 'missing'}."
        )
    if data.get("plan_name") is None:
        broken("credit_status plan_name must not be null, but it was.")
    try:
        CreditStatus.model_validate(data)
    except ValidationError as exc:
        broken(f"credit_status must return a valid CreditStatus, but {first_error(exc)}.")
    return Balance(data["credits_remaining"], data["free_uses_remaining"], data["total_uses"])


class ProviderContract:
    """Subclass as `class TestMyProvider(ProviderContract)` and define the `provider` fixture:

        @pytest.fixture
        async def provider(self):
            provider = MyProvider(...)
            await provider.start()
            yield provider
            await provider.stop()

    The lifecycle check stops the provider and starts it again (twice) before the fixture's own
    `stop`, so `start` must work after `stop`.
    """

    #: Whether `give_back` returns a free use its spend took. A provider that cannot (the `ciris`
    #: provider: its backend has no way to, and a refund would mint a paid credit) sets False: its
    #: give-backs are then checked on paid credit (which needs `add_paid_credit`), and a give-back
    #: of a free use is checked to add nothing, to neither count.
    returns_free_uses: ClassVar[bool] = True
    #: Whether `spend` takes a use. A provider under which every user has credit and nothing is
    #: charged (`unlimited`) sets False: the checks of what a spend takes or a give-back returns
    #: skip, and the kit checks instead that spends succeed, change no balance, and that the
    #: provider says so (`gate_charges` false).
    charges_uses: ClassVar[bool] = True
    #: Whether `give_back_product` returns the product use its spend took. The `ciris` provider sets
    #: False (its backend cannot give back a tool use): the product give-back check then skips.
    returns_product_uses: ClassVar[bool] = True
    #: The identity namespaces of the kit's users; isolation is checked across the first two.
    namespaces: ClassVar[tuple[str, str]] = ("local", "google")
    #: The most uses the kit spends to empty one user's balance; checks that would need more skip.
    max_spends: ClassVar[int] = 100
    #: How long the kit waits for what the contract lets a provider finish later: a `give_back`
    #: that raises `ProviderUnavailable` until it can, a completed payment turning `succeeded`,
    #: the provider's tasks ending after `stop`.
    settle_seconds: ClassVar[float] = 10.0

    # -- hooks ------------------------------------------------------------------------------------
    async def add_paid_credit(self, provider: Any, identity: Identity, uses: int) -> None:
        """Give `identity` (already seen by `credit_status`) `uses` more paid credits.

        Implement it for a provider that sells credit; checks that need it skip otherwise.
        """
        raise NotImplementedError

    async def complete_payment(self, provider: Any, payment_id: str) -> None:
        """Pay the purchase `payment_id` as the payment system would (card charged, credit
        delivered, possibly later: the kit polls `purchase_status` for `settle_seconds`)."""
        raise NotImplementedError

    async def google_play_purchase(self, provider: Any) -> GooglePlayPurchase:
        """A Google Play purchase, never redeemed before, that the provider's store accepts.
        Implement it for a provider that declares `google_play_enabled`; its check skips otherwise."""
        raise NotImplementedError

    async def app_store_purchase(self, provider: Any) -> AppStorePurchase:
        """An App Store transaction, as `google_play_purchase`, for `apple_storekit_enabled`."""
        raise NotImplementedError

    # -- checks -----------------------------------------------------------------------------------
    async def test_every_method_is_a_coroutine_function(self, provider: CreditProvider) -> None:
        for name in ASYNC_METHODS:
            if not inspect.iscoroutinefunction(getattr(provider, name, None)):
                broken(
                    f"CreditProvider.{name} must be a coroutine function (async def), but"
                    f" {type(provider).__name__}.{name} is not."
                )
        for declared in DECLARATIONS:
            value = getattr(provider, declared)
            if not isinstance(value, bool):
                broken(f"{declared} must be a bool, but it was {type(value).__name__}.")

    async def test_credit_status_keeps_the_consistency_rules(self, provider: CreditProvider) -> None:
        for namespace in self.namespaces:
            await self._balance(provider, self.new_identity(namespace))
        identity, before = await self._user_with(provider, 1)
        await self._must_spend(provider, identity, new_key(), before)
        if before.available <= self.max_spends:
            await self._exhausted(provider, identity)

    async def test_spend_twice_with_one_key_takes_one_use(self, provider: CreditProvider) -> None:
        self._skip_unless_charging()
        identity, before = await self._user_with(provider, 2)
        key = new_key()
        await self._must_spend(provider, identity, key, before)
        if not await self._spend(provider, identity, key):
            broken(
                "spend again with the same idempotency key must succeed without taking a use, but it"
                " raised InsufficientCredit."
            )
        taken = before.available - (await self._balance(provider, identity)).available
        if taken != 1:
            broken(f"spend twice with the same idempotency key must take one use, but it took {taken}.")

    async def test_concurrent_spends_never_take_more_than_the_user_had(
        self, provider: CreditProvider
    ) -> None:
        self._skip_unless_charging()
        identity, before = await self._user_with(provider, 2)
        self._skip_if_too_many(before, "spend concurrently past the end of a fresh user's credit")
        attempts = before.available + 3
        results = await asyncio.gather(*(self._spend(provider, identity, new_key()) for _ in range(attempts)))
        succeeded = sum(results)
        after = await self._balance(provider, identity)
        if succeeded > before.available:
            broken(
                f"{attempts} concurrent spends with distinct keys must never take more than the user had"
                f" ({before.available}), but {succeeded} succeeded."
            )
        fell = before.available - after.available
        if fell != succeeded:
            broken(
                "after concurrent spends the balance must fall by exactly the number that succeeded"
                f" ({succeeded}), but it fell by {fell}."
            )

    async def test_spend_without_credit_raises_insufficient_credit_and_changes_nothing(
        self, provider: CreditProvider
    ) -> None:
        self._skip_unless_charging()
        identity = self.new_identity()
        empty = await self._exhausted(provider, identity)
        key = new_key()
        if await self._spend(provider, identity, key):
            broken("spending with no credit must raise InsufficientCredit, but the spend succeeded.")
        after = await self._balance(provider, identity)
        if after != empty:
            broken(f"a spend refused for lack of credit must change nothing, but {empty.change_to(after)}.")
        await self._give_back(provider, identity, key)
        back = await self._balance(provider, identity)
        if back != empty:
            broken(
                f"give_back for a spend that was refused must change nothing, but {empty.change_to(back)}."
            )

    async def test_give_back_of_a_free_use(self, provider: CreditProvider) -> None:
        self._skip_unless_charging()
        identity = self.new_identity()
        before = await self._balance(provider, identity)
        if before.free == 0:
            pytest.skip("a fresh user has no free uses, so there is no free use to give back")
        key = new_key()
        await self._must_spend(provider, identity, key, before)
        await self._must_take_one(provider, identity, before)
        await self._give_back(provider, identity, key)
        back = await self._balance(provider, identity)
        if self.returns_free_uses:
            if (back.paid, back.free) != (before.paid, before.free):
                broken(
                    "give_back must restore exactly what the spend under that key took, but after"
                    f" spend and give_back {before.change_to(back)}."
                )
        elif back.paid > before.paid or back.free > before.free:
            broken(
                "give_back of a free use must never add anything (returns_free_uses is False), but"
                f" after spend and give_back {before.change_to(back)}."
            )
        await self._give_back_again_changes_nothing(provider, identity, key, back)

    async def test_give_back_restores_paid_credit_once(self, provider: CreditProvider) -> None:
        self._skip_unless_charging()
        identity = self.new_identity()
        await self._use_up_free_uses(provider, identity)
        before = await self._add_paid(provider, identity, 3, "check give_back on paid credit")
        key = new_key()
        await self._must_spend(provider, identity, key, before)
        spent = await self._must_take_one(provider, identity, before)
        if spent.paid != before.paid - 1:
            broken(
                f"with no free uses left a spend must take one paid credit, but {before.change_to(spent)}."
            )
        await self._give_back(provider, identity, key)
        back = await self._balance(provider, identity)
        if (back.paid, back.free) != (before.paid, before.free):
            broken(
                "give_back must restore exactly the paid credit its spend took, but after spend and"
                f" give_back {before.change_to(back)}."
            )
        await self._give_back_again_changes_nothing(provider, identity, key, back)

    async def test_a_provider_that_charges_nothing_changes_no_balance(self, provider: CreditProvider) -> None:
        if self.charges_uses:
            pytest.skip("this provider charges uses (charges_uses is true)")
        if provider.gate_charges:
            broken("a provider that takes no use must declare gate_charges false, but it declares true.")
        identity = self.new_identity()
        before = await self._balance(provider, identity)
        if not before.available:
            broken("a provider that charges nothing must give every user credit, but a fresh user has none.")
        keys = [new_key() for _ in range(3)]
        results = await asyncio.gather(*(self._spend(provider, identity, key) for key in keys * 2))
        if not all(results):
            broken("spends under a provider that charges nothing must all succeed, but one raised.")
        for key in keys:
            await self._give_back(provider, identity, key)
        after = await self._balance(provider, identity)
        if after != before:
            broken(f"spends and give-backs must change no balance, but {before.change_to(after)}.")

    # -- weighted spends and the ledger (docs/credits.md); skipped for a provider without them -------
    async def test_a_weighted_spend_takes_its_cost_whole_or_nothing(self, provider: CreditProvider) -> None:
        self._skip_unless_weighted(provider)
        identity, before = await self._user_with(provider, 5)
        key = new_key()
        await self._call(provider, "spend_weighted", identity, key, 3)
        after = await self._balance(provider, identity)
        if after.available != before.available - 3:
            broken(f"spend_weighted with a cost of 3 must take exactly 3, but {before.change_to(after)}.")
        await self._call(provider, "spend_weighted", identity, key, 3)
        if (again := await self._balance(provider, identity)) != after:
            broken(f"spend_weighted twice with one key must take once, but {after.change_to(again)}.")
        try:
            await self._call(provider, "spend_weighted", identity, new_key(), after.available + 1)
        except InsufficientCredit:
            pass
        else:
            broken("spend_weighted beyond the balance must raise InsufficientCredit, but it went through.")
        if (refused := await self._balance(provider, identity)) != after:
            broken(f"a refused spend_weighted must take nothing, but {after.change_to(refused)}.")
        await self._give_back(provider, identity, key)
        if (back := await self._balance(provider, identity)).available != before.available:
            broken(f"give_back of a weighted spend must return all of it, but {after.change_to(back)}.")

    async def test_a_reservation_keeps_what_is_settled_and_returns_the_rest(
        self, provider: CreditProvider
    ) -> None:
        self._skip_unless_weighted(provider)
        identity, before = await self._user_with(provider, 5)
        key = new_key()
        await self._call(provider, "reserve", identity, key, 5)
        held = await self._balance(provider, identity)
        if held.available != before.available - 5:
            broken(f"reserve of 5 must hold exactly 5, but {before.change_to(held)}.")
        await self._call(provider, "settle", identity, key, 2, None)
        await self._call(provider, "settle", identity, key, 1, None)
        settled = await self._balance(provider, identity)
        if settled.available != before.available - 2:
            broken(f"settling 2 of 5 (then again) must keep exactly 2, but {before.change_to(settled)}.")
        await self._give_back(provider, identity, key)
        if (back := await self._balance(provider, identity)).available != before.available:
            broken(
                f"give_back of a settled reservation must return what it kept, but {settled.change_to(back)}."
            )

    async def test_ledger_grants_are_spent_free_then_soonest_expiring_then_paid(
        self, provider: CreditProvider
    ) -> None:
        ledger = self._ledger(provider)
        identity = self.new_identity()
        account = Account(identity.namespace, identity.user_id)
        free = (await self._balance(provider, identity)).free
        self._skip_if_too_many(Balance(0, free, 0), "spend a fresh user's free uses before the grants")
        expiring = int(ledger.clock()) + 3600
        paid = (await ledger.grant(account, 2, "paid", source="purchase", reason="purchase")).grant.id
        promo = (
            await ledger.grant(
                account, 2, "promotional", source="admin", reason="promotion", expires_at=expiring
            )
        ).grant.id
        await self._call(provider, "spend_weighted", identity, new_key(), free + 3)
        left = {grant.id: grant.remaining for grant in await ledger.grants(account)}
        if (left[promo], left[paid]) != (0, 1):
            broken(
                "spends must take free uses, then the soonest-expiring grant, then paid credit, but after"
                f" a spend of {free + 3} the expiring promotion kept {left[promo]} of 2 and the paid"
                f" grant {left[paid]} of 2."
            )
        status = await self._call(provider, "credit_status", identity)
        if status.credits_remaining != 1:
            broken(
                "paid and promotional grants count in credits_remaining, but it was"
                f" {status.credits_remaining}."
            )

    async def test_ledger_keeps_usage_and_refuses_a_claw_back_beyond_the_balance(
        self, provider: CreditProvider
    ) -> None:
        ledger = self._ledger(provider)
        identity, _ = await self._user_with(provider, 2)
        account = Account(identity.namespace, identity.user_id)
        key = new_key()
        await self._call(provider, "spend_weighted", identity, key, 2)
        usage = Usage(model="conformance-model", input_tokens=7, output_tokens=3)
        await self._call(provider, "record_usage", identity, key, usage)
        totals = await ledger.usage_totals(identity.namespace, identity.user_id, "", "9999", "model")
        found = [(t.key, t.spends, t.credits, t.input_tokens) for t in totals]
        if ("conformance-model", 1, 2, 7) not in found:
            broken(f"usage recorded for a spend must be totalled with it, but the totals were {found}.")
        balance = await ledger.balance(account)
        try:
            await ledger.claw_back(account, balance.total + 1, reason="correction", actor="conformance")
        except Overdrawn:
            pass
        else:
            broken("a claw-back beyond the balance must be refused (Overdrawn), but it went through.")
        if (after := await ledger.balance(account)) != balance:
            broken(
                f"a refused claw-back must change nothing, but the balance went from {balance} to {after}."
            )

    # -- per-product credits (tool credits); skipped for a provider that declares no product ---------
    async def test_product_declarations_are_well_formed(self, provider: CreditProvider) -> None:
        products = self._products(provider)
        for name, product in products.items():
            if not isinstance(product, Product) or product.name != name:
                broken(f"products must map each name to a Product of that name, but {name!r} does not.")
        identity = self.new_identity()
        balances = await self._call(provider, "product_balances", identity)
        if not isinstance(balances, list) or [getattr(b, "product_type", None) for b in balances] != list(
            products
        ):
            broken("product_balances must list one ToolBalance per declared product, in their order.")
        for name in products:
            balance = await self._product_balance(provider, identity, name)
            if balance.product_type != name:
                broken(f"product_balance must answer for {name!r}, but it answered {balance.product_type!r}.")

    async def test_product_spend_takes_one_use_of_that_product_only(self, provider: CreditProvider) -> None:
        self._skip_unless_charging()
        name = next(iter(self._products(provider)))
        identity = self.new_identity()
        before = await self._product_balance(provider, identity, name)
        if not before.total_available:
            pytest.skip(f"a fresh user has no {name} use to spend")
        credit_before = await self._balance(provider, identity)
        others_before = await self._other_products(provider, identity, name)
        key = new_key()
        for _ in range(2):
            if not await self._spend_product(provider, identity, name, key):
                broken(
                    f"spend_product with a use of {name} left must succeed, but it raised InsufficientCredit."
                )
        after = await self._product_balance(provider, identity, name)
        if before.total_available - after.total_available != 1:
            broken(
                f"spend_product twice with one key must take one use of {name}, but"
                f" {before.total_available - after.total_available} were taken."
            )
        if await self._balance(provider, identity) != credit_before:
            broken("spend_product must not touch the interaction credit, but credit_status changed.")
        if await self._other_products(provider, identity, name) != others_before:
            broken("spend_product must not touch another product's balance, but one changed.")

    async def test_product_concurrent_spends_never_take_more_than_there_was(
        self, provider: CreditProvider
    ) -> None:
        self._skip_unless_charging()
        name = next(iter(self._products(provider)))
        identity = self.new_identity()
        before = await self._product_balance(provider, identity, name)
        if before.total_available > self.max_spends:
            pytest.skip(f"a fresh user has more {name} uses than max_spends ({self.max_spends})")
        attempts = before.total_available + 3
        results = await asyncio.gather(
            *(self._spend_product(provider, identity, name, new_key()) for _ in range(attempts))
        )
        after = await self._product_balance(provider, identity, name)
        if sum(results) != before.total_available or after.total_available != 0:
            broken(
                f"{attempts} concurrent spends of {name} must take exactly the {before.total_available} uses"
                f" there were, but {sum(results)} succeeded and {after.total_available} remain."
            )

    async def test_product_give_back_returns_the_use_once(self, provider: CreditProvider) -> None:
        self._skip_unless_charging()
        if not self.returns_product_uses:
            pytest.skip("this provider cannot give back a product use (returns_product_uses is false)")
        name = next(iter(self._products(provider)))
        identity = self.new_identity()
        before = await self._product_balance(provider, identity, name)
        if not before.total_available:
            pytest.skip(f"a fresh user has no {name} use to spend")
        key = new_key()
        await self._spend_product(provider, identity, name, key)
        for _ in range(2):
            await self._call(provider, "give_back_product", identity, name, key)
        await self._call(provider, "give_back_product", identity, name, new_key())
        after = await self._product_balance(provider, identity, name)
        if after.total_available != before.total_available:
            broken(
                f"give_back_product (twice, and once for a key never spent) must return exactly the one use"
                f" taken, but {name} went from {before.total_available} to {after.total_available}."
            )

    async def test_give_back_for_a_key_never_spent_changes_nothing(self, provider: CreditProvider) -> None:
        identity, before = await self._user_with(provider, 1)
        await self._must_spend(provider, identity, new_key(), before)
        spent = await self._balance(provider, identity)
        await self._give_back(provider, identity, new_key())
        after = await self._balance(provider, identity)
        if after != spent:
            broken(
                f"give_back for a key that was never spent must change nothing, but {spent.change_to(after)}."
            )

    async def test_users_are_isolated_also_across_namespaces(self, provider: CreditProvider) -> None:
        self._skip_unless_charging()
        first, second = self.namespaces
        alice, alice_before = await self._user_with(provider, 1, self.new_identity(first))
        bob = self.new_identity(first)
        twin = self.new_identity(second, alice.user_id)
        bob_before = await self._balance(provider, bob)
        twin_before = await self._balance(provider, twin)
        await self._must_spend(provider, alice, new_key(), alice_before)
        bob_after = await self._balance(provider, bob)
        if bob_after != bob_before:
            broken(
                "a spend of one user must never change another user's credit, but the other user's"
                f" {bob_before.change_to(bob_after)}."
            )
        twin_after = await self._balance(provider, twin)
        if twin_after != twin_before:
            broken(
                "a spend of one user must never change the credit of the same user_id in another"
                f" namespace ({second}), but its {twin_before.change_to(twin_after)}."
            )

    async def test_idempotency_keys_are_per_user(self, provider: CreditProvider) -> None:
        self._skip_unless_charging()
        first, second = self.namespaces
        alice, alice_before = await self._user_with(provider, 1, self.new_identity(first))
        key = new_key()
        await self._must_spend(provider, alice, key, alice_before)
        alice_spent = await self._balance(provider, alice)
        for other, who in (
            (self.new_identity(first), "another user"),
            (self.new_identity(second, alice.user_id), f"the same user_id in namespace {second}"),
        ):
            other, other_before = await self._user_with(provider, 1, other)
            await self._give_back(provider, other, key)
            alice_now = await self._balance(provider, alice)
            if alice_now != alice_spent:
                broken(
                    f"give_back by {who} under a key this user spent must change nothing for this user,"
                    f" but {alice_spent.change_to(alice_now)}."
                )
            other_now = await self._balance(provider, other)
            if other_now != other_before:
                broken(
                    f"give_back by {who} under a key only this user spent must change nothing for them,"
                    f" but their {other_before.change_to(other_now)}."
                )
            if not await self._spend(provider, other, key):
                broken(
                    f"a spend by {who} under a key this user already spent must take one use of"
                    " their own, but it raised InsufficientCredit."
                )
            taken = other_before.available - (await self._balance(provider, other)).available
            if taken != 1:
                broken(
                    f"idempotency keys are per user: a spend by {who} under a key this user already"
                    f" spent must take one use of their own, but it took {taken}."
                )

    async def test_a_provider_that_does_not_sell_raises_billing_disabled(
        self, provider: CreditProvider
    ) -> None:
        if provider.purchases_enabled:
            pytest.skip("this provider sells credit (purchases_enabled is true)")
        try:
            await self._call(provider, "initiate_purchase", self.new_identity(), None, None)
        except BillingDisabled:
            return
        except BillingError as exc:
            broken(
                "a provider that does not sell (purchases_enabled is false) must raise BillingDisabled"
                f" from initiate_purchase, but it raised {type(exc).__name__}."
            )
        broken(
            "a provider that does not sell (purchases_enabled is false) must raise BillingDisabled from"
            " initiate_purchase, but it started a purchase."
        )

    async def test_a_store_the_provider_does_not_declare_raises_billing_disabled(
        self, provider: CreditProvider
    ) -> None:
        undeclared = [store for store, (declared, _, _) in STORES.items() if not getattr(provider, declared)]
        if not undeclared:
            pytest.skip("this provider redeems purchases of both app stores")
        for store in undeclared:
            declared, method, _ = STORES[store]
            purchase = (
                GooglePlayPurchase(purchase_token=new_key(), product_id="p", package_name="p")
                if store == "google_play"
                else AppStorePurchase(transaction_id=new_key(), product_id="p")
            )
            try:
                await self._call(provider, method, self.new_identity(), purchase)
            except BillingDisabled:
                continue
            except BillingError as exc:
                broken(
                    f"{method} must raise BillingDisabled when {declared} is false, not {type(exc).__name__}."
                )
            broken(f"{method} must raise BillingDisabled when {declared} is false, but it answered.")

    async def test_a_verified_google_play_purchase_adds_its_credits_once(
        self, provider: CreditProvider
    ) -> None:
        await self._store_purchase_adds_once(provider, "google_play")

    async def test_a_verified_app_store_purchase_adds_its_credits_once(
        self, provider: CreditProvider
    ) -> None:
        await self._store_purchase_adds_once(provider, "app_store")

    async def _store_purchase_adds_once(self, provider: CreditProvider, store: str) -> None:
        declared, method, hook = STORES[store]
        if not getattr(provider, declared):
            pytest.skip(f"this provider does not redeem this store's purchases ({declared} is false)")
        try:
            purchase = await getattr(self, hook)(provider)
        except NotImplementedError:
            pytest.skip(f"redeeming a purchase needs the {hook} hook, which is not implemented")
        identity = self.new_identity()
        before = await self._balance(provider, identity)
        replies = await asyncio.gather(
            *(
                self._typed(provider, method, StoreVerification, identity, purchase)
                for _ in range(CONCURRENT_VERIFIES)
            )
        )
        replies.append(await self._typed(provider, method, StoreVerification, identity, purchase))
        if not all(reply.success for reply in replies):
            broken(
                f"{method} must succeed for a purchase the store accepts, but it said: {replies[0].error}."
            )
        firsts = [reply for reply in replies if not reply.already_processed]
        if len(firsts) != 1 or firsts[0].credits_added <= 0:
            broken(
                f"{method} must redeem one purchase exactly once: of {len(replies)} identical calls"
                f" ({CONCURRENT_VERIFIES} at once, then one more), exactly one must add credits and the"
                f" others say already_processed, but {len(firsts)} added"
                f" {[reply.credits_added for reply in firsts]}."
            )
        after = await self._balance(provider, identity)
        if after.available - before.available != firsts[0].credits_added:
            broken(
                f"a verified purchase must add exactly its credits_added ({firsts[0].credits_added}) once,"
                f" but {before.change_to(after)}."
            )

    async def test_a_payment_is_visible_to_its_owner_only(self, provider: CreditProvider) -> None:
        self._skip_unless_selling(provider)
        owner = self.new_identity()
        purchase = await self._initiate(provider, owner, new_key())
        status = await self._purchase_status(provider, owner, purchase.payment_id)
        if status.status == "succeeded":
            broken("a payment nobody has paid must not be succeeded, but purchase_status said so.")
        strangers = (
            (self.new_identity(owner.namespace), "another user", purchase.payment_id),
            (
                self.new_identity(self.namespaces[1], owner.user_id),
                f"the same user_id in namespace {self.namespaces[1]}",
                purchase.payment_id,
            ),
            (owner, "an id no purchase has", f"{purchase.payment_id}-{new_key()}"),
        )
        for stranger, who, payment_id in strangers:
            try:
                seen = await self._purchase_status(provider, stranger, payment_id)
            except PaymentNotFound:
                continue
            broken(
                f"a payment must be visible to its owner only: purchase_status for {who} must raise"
                f" PaymentNotFound, but it answered {seen.status}."
            )

    async def test_initiate_purchase_replays_per_user_and_key(self, provider: CreditProvider) -> None:
        self._skip_unless_selling(provider)
        alice, bob = self.new_identity(), self.new_identity()
        key = new_key()
        first = await self._initiate(provider, alice, key)
        again = await self._initiate(provider, alice, key)
        if again.payment_id != first.payment_id:
            broken(
                "initiate_purchase must replay the same user's earlier reply for a repeated"
                " idempotency key, but it started another payment."
            )
        other = await self._initiate(provider, bob, key)
        if other.payment_id == first.payment_id:
            broken(
                "initiate_purchase must never replay another user's purchase for the same idempotency"
                " key, but it did."
            )

    async def test_a_completed_payment_adds_its_uses_once(self, provider: CreditProvider) -> None:
        self._skip_unless_selling(provider)
        identity = self.new_identity()
        before = await self._balance(provider, identity)
        purchase = await self._initiate(provider, identity, new_key())
        if (await self._purchase_status(provider, identity, purchase.payment_id)).status == "succeeded":
            broken("a payment nobody has paid must not be succeeded, but purchase_status said so.")
        try:
            await self.complete_payment(provider, purchase.payment_id)
        except NotImplementedError:
            pytest.skip("completing a payment needs the complete_payment hook, which is not implemented")
        done = await self._until_succeeded(provider, identity, purchase.payment_id)
        if done.credits_added != purchase.uses_purchased:
            broken(
                "a completed payment must report credits_added equal to the uses it bought"
                f" ({purchase.uses_purchased}), but it reported {done.credits_added}."
            )
        after = await self._balance(provider, identity)
        added = after.available - before.available
        if added != purchase.uses_purchased:
            broken(
                f"a completed payment must add exactly its uses ({purchase.uses_purchased}) once, but"
                f" {before.change_to(after)}."
            )
        for _ in range(2):
            again = await self._purchase_status(provider, identity, purchase.payment_id)
            if again.status != "succeeded" or again.credits_added != done.credits_added:
                broken(
                    "payment status moves only forward: a succeeded payment must stay succeeded with"
                    f" the same credits_added, but it became {again.status} with {again.credits_added}."
                )
        final = await self._balance(provider, identity)
        if final != after:
            broken(
                "a completed payment must add its uses once: asking for its status again must add"
                f" nothing, but {after.change_to(final)}."
            )

    async def test_transactions_honour_limit_and_offset(self, provider: CreditProvider) -> None:
        identity, balance = await self._user_with(provider, 3)
        for _ in range(3):
            await self._must_spend(provider, identity, new_key(), balance)
            balance = await self._balance(provider, identity)
        full = await self._page(provider, identity, 100, 0)
        total = full.total_count
        ids = [item.transaction_id for item in full.transactions]
        for offset in range(min(total, 10)):
            page = await self._page(provider, identity, 1, offset)
            if page.total_count != total:
                broken(
                    "transactions total_count must not depend on limit and offset, but it was"
                    f" {total} for limit 100 and {page.total_count} for limit 1 at offset {offset}."
                )
            if [item.transaction_id for item in page.transactions] != ids[offset : offset + 1]:
                broken(
                    "transactions pages must be slices of one list: limit 1 at offset"
                    f" {offset} must give the item at that position of the full page, but it did not."
                )
        beyond = await self._page(provider, identity, 100, total + 5)
        if beyond.transactions:
            broken(
                f"transactions past the end (offset {total + 5} of {total}) must be an empty page, but it"
                f" held {len(beyond.transactions)}."
            )
        stranger, stranger_before = await self._user_with(provider, 1)
        await self._must_spend(provider, stranger, new_key(), stranger_before)
        theirs = await self._page(provider, stranger, 100, 0)
        if set(ids) & {item.transaction_id for item in theirs.transactions}:
            broken("transactions must list the user's own only, but another user's page held theirs.")

    async def test_health_says_ready_while_its_backend_is_up(self, provider: CreditProvider) -> None:
        result = await self._call(provider, "health")
        if result is not None:
            broken(
                "health must return None while the provider can serve (its backend up, its key"
                f" accepted), but it returned {result!r}."
                if isinstance(result, str)
                else f"health must return None or a short reason, but it returned {type(result).__name__}."
            )

    async def test_stop_leaves_no_task_running_and_start_works_again(self, provider: CreditProvider) -> None:
        baseline = asyncio.all_tasks()
        for phase in ("stop", "stop after a restart"):
            identity, before = await self._user_with(provider, 1)
            key = new_key()
            await self._must_spend(provider, identity, key, before)
            await self._give_back(provider, identity, key)
            returns_none("stop", await self._call(provider, "stop"))
            left = await self._pending_after(baseline)
            if left:
                names = ", ".join(sorted({getattr(t.get_coro(), "__qualname__", repr(t)) for t in left}))
                broken(
                    f"{phase} must leave no task of the provider running, but {len(left)} started since"
                    f" the check began did not end ({names})."
                )
            returns_none("start", await self._call(provider, "start"))
        await self._balance(provider, self.new_identity())

    # -- helpers ----------------------------------------------------------------------------------
    def new_identity(self, namespace: str | None = None, user_id: str | None = None) -> Identity:
        """A user no check has used before (unless `user_id` is given)."""
        user_id = user_id or f"conformance-{new_key()[:16]}"
        return Identity(
            user_id=user_id,
            namespace=namespace or self.namespaces[0],
            role="OBSERVER",
            email=f"{user_id}@example.com",
        )

    async def _call(self, provider: CreditProvider, method: str, *args: Any) -> Any:
        """Call a provider method as the proxy does, holding it to the contract on the way: an
        awaitable result, and only the package's errors, of which `ProviderUnavailable` means the
        backend the kit runs against is down (only a `give_back` may ask to be called again)."""
        result = getattr(provider, method)(*args)
        if not inspect.isawaitable(result):
            broken(
                f"{method} must be a coroutine function (async def), but calling it returned"
                f" {type(result).__name__}."
            )
        try:
            return await result
        except ProviderUnavailable as exc:
            if method == "give_back":
                raise
            broken(f"{method} must work while its backend is up, but it raised ProviderUnavailable ({exc}).")
        except BillingError:
            raise
        except Exception as exc:
            broken(
                f"{method} may raise only the errors of ciris_billing_proxy.errors, but it raised"
                f" {type(exc).__name__}."
            )

    async def _typed(self, provider: CreditProvider, method: str, kind: type[Any], *args: Any) -> Any:
        value = await self._call(provider, method, *args)
        if not isinstance(value, kind):
            broken(f"{method} must return a {kind.__name__}, but it returned {type(value).__name__}.")
        try:
            kind.model_validate(plain(value))
        except ValidationError as exc:
            broken(f"{method} must return a valid {kind.__name__}, but {first_error(exc)}.")
        return value

    async def _balance(self, provider: CreditProvider, identity: Identity) -> Balance:
        status = await self._call(provider, "credit_status", identity)
        if not isinstance(status, CreditStatus):
            broken(f"credit_status must return a CreditStatus, but it returned {type(status).__name__}.")
        return check_credit_status(status)

    async def _spend(self, provider: CreditProvider, identity: Identity, key: str) -> bool:
        """True when the spend went through, False when it raised `InsufficientCredit`."""
        return (await self._spend_told(provider, identity, key))[0]

    async def _spend_told(
        self, provider: CreditProvider, identity: Identity, key: str
    ) -> tuple[bool, CreditStatus | None]:
        """`_spend`, and the `CreditStatus` the spend returned, if any (it may return None)."""
        try:
            result = await self._call(provider, "spend", identity, key)
        except InsufficientCredit:
            return False, None
        except BillingError as exc:
            broken(f"spend may raise only InsufficientCredit for a user, but it raised {type(exc).__name__}.")
        if result is not None:
            if not isinstance(result, CreditStatus):
                broken(f"spend must return None or a CreditStatus, but it returned {type(result).__name__}.")
            check_credit_status(result)
        return True, result

    async def _must_spend(
        self, provider: CreditProvider, identity: Identity, key: str, before: Balance
    ) -> None:
        spent, told = await self._spend_told(provider, identity, key)
        if not spent:
            broken(
                "spend must succeed while credit_status shows credit and no other spend runs, but it"
                f" raised InsufficientCredit with {before.available} available."
            )
        if told is not None and check_credit_status(told).available != before.available - 1:
            broken(
                "the CreditStatus spend returns must show the credit left right after it, but it shows "
                f"{check_credit_status(told).available} available after a spend from {before.available}."
            )

    async def _must_take_one(self, provider: CreditProvider, identity: Identity, before: Balance) -> Balance:
        after = await self._balance(provider, identity)
        if after.available != before.available - 1:
            broken(f"a spend must take exactly one use, but {before.change_to(after)}.")
        return after

    async def _give_back(self, provider: CreditProvider, identity: Identity, key: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_seconds
        while True:
            try:
                result = await self._call(provider, "give_back", identity, key)
            except ProviderUnavailable:
                if loop.time() > deadline:
                    broken(
                        "give_back must finish once its backend is up, but it still raised"
                        f" ProviderUnavailable after {self.settle_seconds} s."
                    )
                await asyncio.sleep(POLL_SECONDS)
                continue
            except BillingError as exc:
                broken(
                    "give_back may raise only ProviderUnavailable (to be called again), but it raised"
                    f" {type(exc).__name__}."
                )
            returns_none("give_back", result)
            return

    async def _give_back_again_changes_nothing(
        self, provider: CreditProvider, identity: Identity, key: str, back: Balance
    ) -> None:
        await self._give_back(provider, identity, key)
        again = await self._balance(provider, identity)
        if again != back:
            broken(f"a second give_back under the same key must change nothing, but {back.change_to(again)}.")

    def _skip_if_too_many(self, balance: Balance, purpose: str) -> None:
        if balance.available > self.max_spends:
            pytest.skip(
                f"to {purpose} the kit would spend {balance.available} uses, more than max_spends"
                f" ({self.max_spends})"
            )

    async def _add_paid(
        self, provider: CreditProvider, identity: Identity, uses: int, purpose: str
    ) -> Balance:
        before = await self._balance(provider, identity)
        try:
            await self.add_paid_credit(provider, identity, uses)
        except NotImplementedError:
            unchecked = (
                "" if self.returns_free_uses else " (with returns_free_uses False, give_back goes unchecked)"
            )
            pytest.skip(
                f"to {purpose} the kit needs the add_paid_credit hook, which is not implemented{unchecked}"
            )
        after = await self._balance(provider, identity)
        if after.paid != before.paid + uses:
            broken(
                f"the add_paid_credit hook must add exactly {uses} paid credits, but"
                f" {before.change_to(after)}."
            )
        return after

    async def _user_with(
        self, provider: CreditProvider, uses: int, identity: Identity | None = None
    ) -> tuple[Identity, Balance]:
        """A user with at least `uses` available: a fresh one, topped up with paid credit if need be."""
        identity = identity or self.new_identity()
        balance = await self._balance(provider, identity)
        if balance.available < uses:
            balance = await self._add_paid(
                provider,
                identity,
                uses - balance.available,
                f"give a user {uses} uses (a fresh one has {balance.available})",
            )
        return identity, balance

    async def _exhausted(self, provider: CreditProvider, identity: Identity) -> Balance:
        """Spend every use the user has, one at a time; the balance that leaves."""
        balance = await self._balance(provider, identity)
        self._skip_if_too_many(balance, "use up a user's credit")
        for _ in range(balance.available):
            await self._must_spend(provider, identity, new_key(), balance)
            balance = await self._balance(provider, identity)
        if balance.available:
            broken(
                "spending every use one at a time must leave none, but"
                f" {balance.available} remain after as many spends."
            )
        return balance

    async def _use_up_free_uses(self, provider: CreditProvider, identity: Identity) -> None:
        balance = await self._balance(provider, identity)
        if balance.free > self.max_spends:
            pytest.skip(
                f"to use up a fresh user's {balance.free} free uses the kit would spend more than"
                f" max_spends ({self.max_spends})"
            )
        while balance.free:
            await self._must_spend(provider, identity, new_key(), balance)
            balance = await self._must_take_one(provider, identity, balance)

    def _products(self, provider: CreditProvider) -> Mapping[str, Product]:
        products = provider.products
        if not isinstance(products, Mapping):
            broken(f"products must be a mapping, but it was {type(products).__name__}.")
        if not products:
            pytest.skip("this provider sells no product per use (products is empty)")
        return products

    async def _product_balance(self, provider: CreditProvider, identity: Identity, name: str) -> ToolBalance:
        balance: ToolBalance = await self._typed(provider, "product_balance", ToolBalance, identity, name)
        return balance

    async def _other_products(
        self, provider: CreditProvider, identity: Identity, name: str
    ) -> list[ToolBalance]:
        return [
            await self._product_balance(provider, identity, other)
            for other in provider.products
            if other != name
        ]

    async def _spend_product(self, provider: CreditProvider, identity: Identity, name: str, key: str) -> bool:
        try:
            result = await self._call(provider, "spend_product", identity, name, key)
        except InsufficientCredit:
            return False
        except BillingError as exc:
            broken(f"spend_product may raise only InsufficientCredit, but it raised {type(exc).__name__}.")
        returns_none("spend_product", result)
        return True

    def _skip_unless_weighted(self, provider: CreditProvider) -> None:
        self._skip_unless_charging()
        if not provider.weighted_spends:
            pytest.skip("this provider takes one use per spend (weighted_spends is false)")

    def _ledger(self, provider: CreditProvider) -> Ledger:
        ledger = provider.credit_ledger
        if ledger is None:
            pytest.skip("this provider keeps no credit ledger (credit_ledger is None)")
        if not isinstance(ledger, Ledger):
            broken(f"credit_ledger must be None or a Ledger, but it was {type(ledger).__name__}.")
        return ledger

    def _skip_unless_charging(self) -> None:
        if not self.charges_uses:
            pytest.skip("this provider takes no use (charges_uses is false)")

    def _skip_unless_selling(self, provider: CreditProvider) -> None:
        if not provider.purchases_enabled:
            pytest.skip("this provider does not sell credit (purchases_enabled is false)")

    async def _initiate(self, provider: CreditProvider, identity: Identity, key: str) -> PurchaseInitiated:
        try:
            purchase: PurchaseInitiated = await self._typed(
                provider, "initiate_purchase", PurchaseInitiated, identity, None, key
            )
        except BillingError as exc:
            broken(
                "initiate_purchase must start a purchase for a user with an email when purchases_enabled"
                f" is true, but it raised {type(exc).__name__}."
            )
        return purchase

    async def _purchase_status(
        self, provider: CreditProvider, identity: Identity, payment_id: str
    ) -> PurchaseStatus:
        try:
            status: PurchaseStatus = await self._typed(
                provider, "purchase_status", PurchaseStatus, identity, payment_id
            )
        except PaymentNotFound:
            raise
        except BillingError as exc:
            broken(
                "purchase_status may raise only PaymentNotFound when purchases_enabled is true, but it"
                f" raised {type(exc).__name__}."
            )
        return status

    async def _until_succeeded(
        self, provider: CreditProvider, identity: Identity, payment_id: str
    ) -> PurchaseStatus:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_seconds
        while True:
            try:
                status = await self._purchase_status(provider, identity, payment_id)
            except PaymentNotFound:
                broken("purchase_status must find its owner's payment, but it raised PaymentNotFound.")
            if status.status == "succeeded":
                return status
            if status.status in FAILED_STATES:
                broken(f"after complete_payment the payment must reach succeeded, but it is {status.status}.")
            if loop.time() > deadline:
                broken(
                    "after complete_payment the payment must reach succeeded, but it is still"
                    f" {status.status} after {self.settle_seconds} s."
                )
            await asyncio.sleep(POLL_SECONDS)

    async def _page(
        self, provider: CreditProvider, identity: Identity, limit: int, offset: int
    ) -> TransactionPage:
        page: TransactionPage = await self._typed(
            provider, "transactions", TransactionPage, identity, limit, offset
        )
        count = len(page.transactions)
        if count > limit:
            broken(f"transactions must return at most limit ({limit}) items, but it returned {count}.")
        if page.has_more is not (offset + count < page.total_count):
            broken(
                "transactions has_more must be true exactly when offset + the items returned <"
                f" total_count, but it was {page.has_more} with offset {offset}, {count} returned and"
                f" total_count {page.total_count}."
            )
        if count and offset + count > page.total_count:
            broken(
                f"transactions total_count must count every item, but it was {page.total_count} with"
                f" {count} returned from offset {offset}."
            )
        for item in page.transactions:
            # The extras are passed on as they are: a metadata the route cannot send as JSON would
            # fail every listing of this user.
            try:
                json.dumps(item.metadata, allow_nan=False)
            except (TypeError, ValueError):
                broken(
                    f"transaction {item.transaction_id!r} metadata must be plain JSON (strings, numbers,"
                    " bools, null, lists and objects), but it is not."
                )
        return page

    async def _pending_after(self, baseline: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        """Tasks started since `baseline` that do not end within `settle_seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_seconds
        current = asyncio.current_task()
        while True:
            left = [t for t in asyncio.all_tasks() if t not in baseline and t is not current and not t.done()]
            if not left or loop.time() > deadline:
                return left
            await asyncio.sleep(POLL_SECONDS)
