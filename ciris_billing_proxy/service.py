"""The billing service: one provider, its credit cache and the token verifier, as one handle.

`setup_billing` returns it and stores it on the app; routes, the credit gate and host code all go
through it, so they share one identity, one cache and one view of the user's credit.
Every provider failure leaves here as a `BillingError`: a provider bug becomes `ProviderUnavailable`
(logged with its traceback), never a 500 with internals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiohttp import web
from cachetools import LRUCache

from .auth import TokenVerifier
from .cache import CreditCache
from .config import BillingConfig
from .errors import BillingError, InsufficientCredit, ProviderUnavailable
from .identity import Identity
from .models import (
    AppStorePurchase,
    Capabilities,
    CreditStatus,
    GooglePlayPurchase,
    PurchaseInitiated,
    PurchaseStatus,
    StoreVerification,
    TransactionPage,
)
from .ops.audit import AuditKind, AuditTrail, user_of
from .providers.base import CreditProvider
from .retries import GiveBackRetries
from .store.changes import FEED_DOWN_MAX_AGE_SECONDS, ChangeFeed, IdentityKey

T = TypeVar("T")

#: Purchase states that end a purchase: audited once each.
ENDED: Final = frozenset({"succeeded", "failed", "canceled"})

logger = logging.getLogger("ciris_billing_proxy")


@dataclass(frozen=True, slots=True)
class CachedCredit:
    """What the cache keeps per user: the `/credits` reply, serialised once (the hot path sends these
    bytes as they are), and whether it shows credit (which decides how long it is kept).

    Instances are shared between users whose replies are byte-for-byte the same (see `_load_status`):
    statuses repeat a lot (a few remaining-use counts), which keeps a large cache small."""

    body: bytes
    has_credit: bool

    def status(self) -> CreditStatus:
        return CreditStatus.model_validate_json(self.body)


class BillingService:
    """The handle `setup_billing` returns: one provider, its credit cache and the token verifier.

    Host code uses it for what the routes and the gate do, with the same identity and cache:

    * `await credit_status(identity)`: the user's `CreditStatus` (cached for `cache_ttl_seconds`);
    * `await spend(identity, key)` / `await give_back(identity, key)`: take one use, or return it
      (a give-back the provider cannot make now is retried in the background, never dropped);
    * `capabilities()`: what the provider offers (purchases, transactions);
    * `await initiate_purchase(...)`, `await purchase_status(...)`, `await transactions(...)`;
    * `invalidate(identity)`: forget the cached credit after it changed elsewhere (`invalidate()`:
      everyone's), in every process sharing the database;
    * `revoke_token(token)`: refuse a bearer token from now on, here at once and in every other
      process in the background; `await revoke_everywhere(token)` returns once every process will;
    * `provider`, `config`: what it was built with.

    With a change feed (`setup_billing` gives it one on the configured database), every change
    made here reaches the other processes sharing that database, and theirs reach this one: it is
    the `ChangeListener` of its feed.

    Every provider failure leaves it as a `BillingError` (a bug becomes `ProviderUnavailable`).
    """

    def __init__(
        self,
        config: BillingConfig,
        provider: CreditProvider,
        verifier: TokenVerifier,
        feed: ChangeFeed | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self.config = config
        #: Where money and auth events go (`ops.audit`); `setup_billing` runs its lifespan.
        self.audit = audit or AuditTrail()
        # Payments whose end (settled, failed) was audited: a status is polled until it ends and
        # then may be asked again, but the fact is one event.
        self._audited_payments: LRUCache[str, None] = LRUCache(maxsize=4096)
        self.provider = provider
        self.verifier = verifier
        self.feed = feed
        negative_ttl = min(config.negative_cache_ttl_seconds, config.cache_ttl_seconds)
        self.cache: CreditCache[CachedCredit] = CreditCache(
            self._load_status,
            ttl=config.cache_ttl_seconds,
            maxsize=config.cache_max_entries,
            ttl_of=lambda entry: config.cache_ttl_seconds if entry.has_credit else negative_ttl,
        )
        self._money_tasks: set[asyncio.Task[Any]] = set()
        self.retries = GiveBackRetries(self._give_back_once, max_interval=config.give_back_retry_max_seconds)
        self._interned: LRUCache[bytes, CachedCredit] = LRUCache(maxsize=4096)

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        """`cleanup_ctx` entry: start the feed and the provider, and on shutdown finish money-moving
        work first."""
        if self.feed is not None:
            await self.feed.start(self)
        try:
            await self.provider.start()
        except BaseException:
            await self.provider.stop()
            if self.feed is not None:
                await self.feed.stop()
            raise
        try:
            yield
        finally:
            await self.cache.aclose()
            # A finishing task may start another (a give-back after a spend): drain until none is
            # left, stop the retries (one stopped mid-call leaves that call to drain), drain again.
            # A give-back that fails after the retries stopped is logged with its key, not retried.
            await self._drain()
            await self.retries.aclose()
            await self._drain()
            await self.provider.stop()
            if self.feed is not None:
                await self.feed.stop()

    async def _drain(self) -> None:
        while self._money_tasks:
            await asyncio.gather(*list(self._money_tasks), return_exceptions=True)

    async def credit_status(self, identity: Identity) -> CreditStatus:
        return (await self.cache.get(identity)).status()

    async def credit_reply(self, identity: Identity) -> bytes:
        """The `/credits` JSON body, from the cache when fresh."""
        return (await self.cache.get(identity)).body

    def capabilities(self) -> Capabilities:
        """What the provider declares it offers. Read on every call (a provider may change what it
        offers while running); a declaration that is not a bool is a provider bug, answered 503."""
        declared = {
            name: getattr(self.provider, name)
            for name in (
                "purchases_enabled",
                "keeps_transactions",
                "google_play_enabled",
                "apple_storekit_enabled",
                "gate_charges",
            )
        }
        for attribute, value in declared.items():
            if not isinstance(value, bool):
                logger.error(
                    "Credit provider %r declared %s as %s; expected bool",
                    self.provider.name,
                    attribute,
                    type(value).__name__,
                )
                raise ProviderUnavailable(maybe_applied=False)
        return Capabilities(
            provider=self.provider.name,
            purchases=declared["purchases_enabled"],
            transactions=declared["keeps_transactions"],
            google_play=declared["google_play_enabled"],
            apple_storekit=declared["apple_storekit_enabled"],
            charges=declared["gate_charges"],
        )

    def revoke_token(self, token: str) -> None:
        """Refuse a bearer token from now on (logout), even though it has not expired: here at
        once, and in the other processes once it is recorded (in the background; a failure to
        record it is logged)."""
        revoked = self.verifier.revoke(token)
        if revoked is not None and self.feed is not None:
            self._track(self._share_revocation(*revoked))

    async def revoke_everywhere(self, token: str) -> None:
        """Refuse a bearer token from now on, here at once, and return once it is recorded for
        every process (`ProviderUnavailable` when the database cannot be reached: refused here
        only)."""
        revoked = self.verifier.revoke(token)
        if revoked is not None and self.feed is not None:
            await asyncio.shield(self._track(self.feed.revoke(*revoked)))

    async def _share_revocation(self, digest: bytes, until: float) -> None:
        assert self.feed is not None
        try:
            await self.feed.revoke(digest, until)
        except ProviderUnavailable:
            logger.warning("Could not record a revoked token for the other processes")

    def invalidate(self, identity: Identity | None = None) -> None:
        """Forget the cached credit of a user (without one: of everyone) whose credit changed
        outside this process's calls, here and in every process sharing the database."""
        if identity is None:
            self.cache.clear()
            if self.feed is not None:
                self.feed.changed_all()
        else:
            self._forget(identity)

    def _forget(self, identity: Identity) -> None:
        self.cache.invalidate(identity)
        if self.feed is not None:
            self.feed.changed(identity.key)

    def identity_changed(self, key: IdentityKey) -> None:
        self.cache.invalidate_key(key)

    def all_changed(self) -> None:
        self.cache.clear()

    def token_revoked(self, digest: bytes, until: float) -> None:
        self.verifier.revoke_digest(digest, until)

    def feed_down(self) -> None:
        self.cache.limit_lifetime(min(FEED_DOWN_MAX_AGE_SECONDS, self.config.cache_ttl_seconds))

    def feed_up(self) -> None:
        self.cache.limit_lifetime(None)

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        task = self._track(
            self._change_credit(
                self.provider.spend(identity, idempotency_key), identity, "spend", idempotency_key
            )
        )
        try:
            await asyncio.shield(task)
        except (asyncio.CancelledError, ProviderUnavailable):
            # The caller went away while the use was being taken, or the spend failed in a way that
            # may have taken effect (a timeout after the backend committed): settle it in the
            # background once the spend's outcome is known.
            self._track(self._give_back_after(task, identity, idempotency_key))
            raise

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        """Give back the use spent under this key. When the provider cannot do it now
        (`ProviderUnavailable`), it is retried in the background until it can: never dropped.

        The give-back and the decision to retry it run as one tracked task: a caller cancelled
        while it waits (a client gone, a host's timeout) cannot leave a failure unhandled."""
        await asyncio.shield(self._track(self._give_back_or_retry(identity, idempotency_key)))

    async def _give_back_or_retry(self, identity: Identity, key: str) -> None:
        try:
            await self._give_back_once(identity, key)
        except ProviderUnavailable:
            self._retry_later(identity, key)
        except BillingError:
            logger.warning("Could not give back the use spent under request key %s", key)

    async def _give_back_once(self, identity: Identity, key: str) -> None:
        task = self._track(
            self._change_credit(self.provider.give_back(identity, key), identity, "give_back", key)
        )
        await asyncio.shield(task)

    def _retry_later(self, identity: Identity, key: str) -> None:
        if self.retries.schedule(identity, key):
            logger.warning(
                "Could not give back the use spent under request key %s yet; retrying in the background",
                key,
            )

    async def initiate_purchase(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None
    ) -> PurchaseInitiated:
        call = self.provider.initiate_purchase(identity, return_url, idempotency_key)
        return await asyncio.shield(self._track(self._initiated(identity, call)))

    async def _initiated(self, identity: Identity, call: Awaitable[PurchaseInitiated]) -> PurchaseInitiated:
        try:
            initiated = await self._guard(call, "initiate_purchase", PurchaseInitiated)
        except BillingError as exc:
            self.audit.record(AuditKind.PURCHASE_INITIATED, user_of(identity), _outcome(exc))
            raise
        self.audit.record(
            AuditKind.PURCHASE_INITIATED,
            user_of(identity),
            "ok",
            amount=initiated.uses_purchased,
            reference=initiated.payment_id,
        )
        return initiated

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        status = await self._guard(
            self.provider.purchase_status(identity, payment_id), "purchase_status", PurchaseStatus
        )
        if status.status == "succeeded":
            self._forget(identity)
        if status.status in ENDED and payment_id not in self._audited_payments:
            self._audited_payments[payment_id] = None
            kind = AuditKind.PURCHASE_SETTLED if status.status == "succeeded" else AuditKind.PURCHASE_FAILED
            outcome = "ok" if status.status == "succeeded" else status.status
            self.audit.record(
                kind, user_of(identity), outcome, amount=status.credits_added, reference=payment_id
            )
        return status

    async def verify_google_play(self, identity: Identity, purchase: GooglePlayPurchase) -> StoreVerification:
        call = self.provider.verify_google_play(identity, purchase)
        return await self._verified(identity, call, "verify_google_play")

    async def verify_app_store(self, identity: Identity, purchase: AppStorePurchase) -> StoreVerification:
        call = self.provider.verify_app_store(identity, purchase)
        return await self._verified(identity, call, "verify_app_store")

    async def _verified(
        self, identity: Identity, call: Awaitable[StoreVerification], what: str
    ) -> StoreVerification:
        """A store verification, run to its end even if the app goes away (it adds credit), and the
        user's cached credit dropped once it succeeded (here and, through the change feed, in every
        process sharing the database), inside that run: a caller's cancellation cannot skip it."""

        async def verify_then_forget() -> StoreVerification:
            try:
                result = await self._guard(call, what, StoreVerification)
            except BillingError as exc:
                self.audit.record(
                    AuditKind.STORE_VERIFICATION, user_of(identity), _outcome(exc), reference=what
                )
                raise
            if result.success:
                self._forget(identity)
            outcome = (
                "already_processed" if result.already_processed else "ok" if result.success else "refused"
            )
            self.audit.record(
                AuditKind.STORE_VERIFICATION,
                user_of(identity),
                outcome,
                amount=result.credits_added,
                reference=what,
            )
            return result

        return await asyncio.shield(self._track(verify_then_forget()))

    async def _load_status(self, identity: Identity) -> CachedCredit:
        status = await self._guard(self.provider.credit_status(identity), "credit_status", CreditStatus)
        body = status.model_dump_json().encode()
        shared = self._interned.get(body)
        if shared is None:
            shared = self._interned[body] = CachedCredit(body, status.has_credit)
        return shared

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        return await self._guard(
            self.provider.transactions(identity, limit, offset), "transactions", TransactionPage
        )

    async def _change_credit(self, call: Awaitable[None], identity: Identity, what: str, key: str) -> None:
        """Run a provider call that changes the user's credit (a spend or a give-back), forget
        the user's cached credit once it is done, whatever its outcome, and audit it."""
        # The cache is dropped inside the tracked task, after the provider call: a caller's
        # cancellation cannot make it happen before the change and let a stale load be cached.
        outcome = "failed"
        try:
            # What spend and give_back return is never used: only their effect and errors count.
            await self._guard(call, what, object)
            outcome = "ok"
        except InsufficientCredit:
            outcome = "refused"
            raise
        finally:
            self._forget(identity)
            self.audit.record(self._audit_kind(what), user_of(identity), outcome, amount=1, reference=key)

    def _audit_kind(self, what: str) -> AuditKind:
        if what == "spend":
            return AuditKind.SPEND
        # A provider that sells credits gives a use back by refunding what was charged for it.
        return AuditKind.REFUND if self.provider.purchases_enabled is True else AuditKind.GIVE_BACK

    async def _give_back_after(self, spend: asyncio.Task[None], identity: Identity, key: str) -> None:
        """Give back what `spend` took, if it may have taken anything. `give_back` is a no-op for a
        use never taken, so an ambiguous failure is reconciled with it too."""
        try:
            await spend
        except ProviderUnavailable as exc:
            if not exc.maybe_applied:
                return
        except BillingError:
            return  # refused outright (no credit): nothing was taken
        await self._give_back_or_retry(identity, key)

    async def _guard(self, call: Awaitable[Any], what: str, expected: type[T]) -> T:
        """The provider's answer, if it is what the interface declares; every failure other than
        a `BillingError` (a bug, a wrong return type) is logged and becomes `ProviderUnavailable`."""
        try:
            result = await call
        except BillingError:
            raise
        except Exception:
            logger.exception("Credit provider %r failed in %s", self.provider.name, what)
            raise ProviderUnavailable from None
        if not isinstance(result, expected):
            logger.error(
                "Credit provider %r returned %s from %s; expected %s",
                self.provider.name,
                type(result).__name__,
                what,
                expected.__name__,
            )
            raise ProviderUnavailable(maybe_applied=False)
        return result

    def _track(self, call: Awaitable[T]) -> asyncio.Task[T]:
        # Calls that move money run as tracked tasks: a client that disconnects (cancelling its
        # handler) cannot leave a half-done spend or purchase, and shutdown waits for them.
        task: asyncio.Task[T] = asyncio.ensure_future(call)
        self._money_tasks.add(task)
        task.add_done_callback(self._money_tasks.discard)
        return task


def _outcome(exc: BillingError) -> str:
    """`refused` when the provider said no by its rules, `failed` when it could not answer."""
    return "failed" if isinstance(exc, ProviderUnavailable) else "refused"
