"""The billing service: one provider, its credit cache and the token verifier, as one handle.

`setup_billing` returns it and stores it on the app; routes, the credit gate and host code all go
through it, so they share one identity, one cache and one view of the user's credit.
Every provider failure leaves here as a `BillingError`: a provider bug becomes `ProviderUnavailable`
(logged with its traceback), never a 500 with internals.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiohttp import web
from cachetools import LRUCache

from .auth import TokenVerifier
from .cache import CreditCache
from .config import BillingConfig, ConfigError
from .credit_models import parse_instant
from .eager import start_eagerly
from .errors import BillingError, InsufficientCredit, InvalidRequest, ProviderUnavailable
from .events.outbox import EventOutbox
from .identity import Identity
from .ledger import Usage
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
from .ops.health import Health, readiness
from .ops.logs import FaultLog
from .ops.metrics import Counts, MultiprocessWriter
from .ops.outbox import GiveBackOutbox
from .products import ToolBalance, ToolCheck, ToolPurchase, ToolPurchaseRequest
from .providers.base import CreditProvider
from .providers.packs import unknown_pack
from .retries import GiveBackRetries
from .store.changes import FEED_DOWN_MAX_AGE_SECONDS, ChangeFeed, IdentityKey
from .store.give_backs import Owed

T = TypeVar("T")

NO_PACKS: Final = "This agent sells no packs: leave out pack"
#: Purchase states that end a purchase: audited once each.
ENDED: Final = frozenset({"succeeded", "failed", "canceled"})

logger = logging.getLogger("ciris_billing_proxy")
#: Fault lines an outage repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logger)


@dataclass(frozen=True, slots=True)
class CachedCredit:
    """What the cache keeps per user: the `/credits` reply, serialised once (the hot path sends these
    bytes as they are), and whether it shows credit (which decides how long it is kept).

    Instances are shared between users whose replies are byte-for-byte the same (see `_load_status`):
    statuses repeat a lot (a few remaining-use counts), which keeps a large cache small."""

    body: bytes
    has_credit: bool
    #: When the reply's soonest-expiring credit expires (Unix time; `next_expiry_at`), or None: the
    #: entry is not kept past it, so a cached reply never shows credit the gate would not take.
    expires_at: float | None = None

    def lifetime(self, ttl: float, negative_ttl: float) -> float:
        """How long to keep this entry: the TTL, shorter without credit, never past an expiry."""
        lifetime = ttl if self.has_credit else negative_ttl
        if self.expires_at is not None:
            lifetime = min(lifetime, max(self.expires_at - time.time(), 0.0))
        return lifetime

    def status(self) -> CreditStatus:
        return CreditStatus.model_validate_json(self.body)


def _unix(when: str | None) -> float | None:
    """An ISO 8601 time as Unix time; None for none, or for one a provider wrote unreadably (then
    the entry is kept for the TTL, as before expiries existed)."""
    if when is None:
        return None
    try:
        return parse_instant(when).timestamp()
    except ValueError:
        return None


def outcome_of(exc: BillingError) -> str:
    """The metrics' outcome of a provider call that raised `exc`."""
    if isinstance(exc, ProviderUnavailable):
        return "unavailable"
    return "insufficient_credit" if isinstance(exc, InsufficientCredit) else "refused"


class ProviderStartError(ConfigError):
    """The provider's `start()` failed: one line naming the provider and why, safe to print
    (the cause, with its traceback, is chained for a host that logs it)."""

    def __init__(self, provider: str, cause: Exception) -> None:
        if isinstance(cause, ProviderUnavailable):
            why = f"its backend or database is unavailable ({cause})"
        else:
            # Only the type: the message of an arbitrary exception may carry a URL or a key.
            why = f"{type(cause).__name__} in start()"
        super().__init__(f"credit provider {provider!r} could not start: {why}")


class BillingService:
    """The handle `setup_billing` returns: one provider, its credit cache and the token verifier.

    Host code uses it for what the routes and the gate do, with the same identity and cache:

    * `await credit_status(identity)`: the user's `CreditStatus` (cached for `cache_ttl_seconds`);
    * `await spend(identity, key)` / `await give_back(identity, key)`: take one use, or return it
      (a give-back the provider cannot make now is kept in the outbox and retried in the
      background, by this process or any other sharing the store, until it is made);
    * `capabilities()`: what the provider offers (purchases, transactions);
    * `await initiate_purchase(...)`, `await purchase_status(...)`, `await transactions(...)`;
    * `invalidate(identity)`: forget the cached credit after it changed elsewhere (`invalidate()`:
      everyone's), in every process sharing the database;
    * `revoke_token(token)`: refuse a bearer token from now on, here at once and in every other
      process in the background; `await revoke_everywhere(token)` returns once every process will;
    * `await end_sessions((namespace, user_id))`: refuse every token of that user issued until now
      (a logout everywhere, a new password), in every process;
    * `await health()`: whether billing can serve now, check by check (what `GET /readyz` answers);
    * `counts`: what the metrics count (`ops.metrics`), `give_backs_owed()`;
    * `audit`: where money and auth events go (`ops.audit`; `audit.record(...)` for the host's own);
    * `provider`, `config`: what it was built with; `stripe_js`: a stand-in Stripe.js to announce;
    * `events`: the billing event outbox and its delivery (`events.outbox`, docs/events.md).

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
        outbox: GiveBackOutbox | None = None,
        audit: AuditTrail | None = None,
        events: EventOutbox | None = None,
    ) -> None:
        self.config = config
        #: Billing events: kept until delivered to the host's callback and the webhook.
        self.events = events
        # Purchases whose `purchase.succeeded` this process emitted (the store keeps it once for all).
        self._emitted_payments: LRUCache[str, None] = LRUCache(maxsize=4096)
        #: Where money and auth events go (`ops.audit`); `setup_billing` runs its lifespan.
        self.audit = audit or AuditTrail()
        # Payments whose end (settled, failed) was audited: a status is polled until it ends and
        # then may be asked again, but the fact is one event.
        self._audited_payments: LRUCache[str, None] = LRUCache(maxsize=4096)
        self.provider = provider
        self.verifier = verifier
        self.feed = feed
        self.outbox = outbox
        #: Where pages load Stripe.js from when it is not Stripe's own: a stand-in such as the fake
        #: Stripe of `serve --fake-backend`, said in `capabilities()`. A real deployment leaves it None.
        self.stripe_js: str | None = None
        negative_ttl = min(config.negative_cache_ttl_seconds, config.cache_ttl_seconds)
        self.cache: CreditCache[CachedCredit] = CreditCache(
            self._load_status,
            ttl=config.cache_ttl_seconds,
            maxsize=config.cache_max_entries,
            ttl_of=lambda entry: entry.lifetime(config.cache_ttl_seconds, negative_ttl),
        )
        self._money_tasks: set[asyncio.Task[Any]] = set()
        self.retries = GiveBackRetries(self._retry_give_back, max_interval=config.give_back_retry_max_seconds)
        #: Give-backs this process took over from the outbox (owed by a process that stopped).
        self._taken_over: dict[tuple[tuple[str, str], str], Owed] = {}
        self._interned: LRUCache[bytes, CachedCredit] = LRUCache(maxsize=4096)
        #: What the metrics count, as plain numbers (`ops.metrics`); its writer in a multiprocess group.
        self.counts = Counts()
        self.metrics_writer: MultiprocessWriter | None = None
        #: "ok" while serving; otherwise why not (the readiness check's "service").
        self.lifecycle = "not started"
        #: Whether the change feed hears the other processes now (see `feed_down`).
        self.feed_listening = False
        self._startup_check: asyncio.Task[None] | None = None

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        """`cleanup_ctx` entry: start the feed, the outbox and the provider, and on shutdown finish
        money-moving work first."""
        if self.feed is not None:
            await self.feed.start(self)
            self.feed_listening = True
        try:
            if self.outbox is not None:
                await self.outbox.open()
            await self.provider.start()
            if self.events is not None:
                await self.events.open(self.provider)
        except BaseException as exc:
            if self.events is not None:
                await self.events.close()
            await self.provider.stop()
            if self.outbox is not None:
                await self.outbox.close()
            if self.feed is not None:
                await self.feed.stop()
            if isinstance(exc, Exception) and not isinstance(exc, ConfigError):
                raise ProviderStartError(self.provider.name, exc) from exc
            raise
        self.lifecycle = "ok"
        self._startup_check = asyncio.create_task(self._check_at_startup())
        if self.outbox is not None:
            self.outbox.start(self._take_over)
        try:
            yield
        finally:
            self.lifecycle = "stopping"
            self._startup_check.cancel()
            await asyncio.gather(self._startup_check, return_exceptions=True)
            await self.cache.aclose()
            # Retries first: while the provider fails, each would start another attempt and a
            # drain would never end. One stopped mid-call leaves that call to the drain, and a
            # finishing task may start another (a give-back after a spend): drain until none is
            # left. Every give-back still owed is kept in the outbox, for the next process.
            if self.outbox is not None:
                await self.outbox.stop()
            owed = await self.retries.aclose()
            if self.outbox is None:
                self.counts.give_backs_abandoned += owed
            await self._drain()
            if owed:
                logger.warning(
                    "Shutting down with %d give-back(s) still owed: %s",
                    owed,
                    "kept in the give-back outbox for the next process (or ciris-billing-proxy reconcile)"
                    if self.outbox is not None
                    else "not retried again, so their uses may not be given back",
                )
            if self.outbox is not None:
                await self.outbox.close()
            # After the drain (the last changes' events are written), before the provider closes
            # the engine the events may be on; an event not delivered yet stays in the store.
            if self.events is not None:
                await self.events.close()
            await self.provider.stop()
            if self.feed is not None:
                await self.feed.stop()

    async def health(self) -> Health:
        """Whether billing can serve now: each check (`service`, `store`, `change_feed`,
        `provider`) as "ok" or why not. What `GET /readyz` answers (see `ops.health`)."""
        return await readiness(self)

    async def _check_at_startup(self) -> None:
        # In the background, so a slow backend does not hold up startup; one line, not a
        # surprise on the first request (a rejected API key, a backend down).
        health = await readiness(self)
        if not health.ready:
            logger.warning("Billing is not ready at startup: %s", health.detail)

    def give_backs_owed(self) -> int:
        """Give-backs owed and not yet made (the `ciris_billing_give_backs_owed` gauge)."""
        return len(self.retries)

    async def _drain(self) -> None:
        while self._money_tasks:
            await asyncio.gather(*list(self._money_tasks), return_exceptions=True)

    async def credit_status(self, identity: Identity) -> CreditStatus:
        return (await self.cache.get(identity)).status()

    async def credit_reply(self, identity: Identity) -> bytes:
        """The `/credits` JSON body, from the cache when fresh."""
        return (await self.cache.get(identity)).body

    def cached_reply(self, identity: Identity) -> bytes | None:
        """The `/credits` JSON body if the cache holds a fresh one, else None (then `credit_reply`
        loads it): the hit, answered without a coroutine."""
        entry = self.cache.peek(identity)
        return None if entry is None else entry.body

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
        products = self.provider.products
        if not isinstance(products, Mapping):
            logger.error("Credit provider %r declared products that are no mapping", self.provider.name)
            raise ProviderUnavailable(maybe_applied=False)
        return Capabilities(
            products=list(products),
            provider=self.provider.name,
            purchases=declared["purchases_enabled"],
            transactions=declared["keeps_transactions"],
            google_play=declared["google_play_enabled"],
            apple_storekit=declared["apple_storekit_enabled"],
            charges=declared["gate_charges"],
            stripe_js=self.stripe_js,
            low_balance_threshold=self.config.low_balance_threshold,
            packs=list(self.provider.packs),
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

    async def end_sessions(self, user: IdentityKey) -> None:
        """Refuse every token of `user` (namespace, user id) issued until now, and any without an
        `iat`: here at once, and returns once it is recorded for every process
        (`ProviderUnavailable` when the database cannot be reached: refused here only).

        The epoch is the next whole second, and this returns once it has come: `iat` counts whole
        seconds, so a token issued in this second is void too, and one issued after this returns
        is not."""
        epoch = float(math.floor(time.time()) + 1)
        self.verifier.move_epoch(user, epoch)
        logger.info("Ended every session of user %s (identity namespace %s)", user[1], user[0])
        if self.feed is not None:
            await asyncio.shield(self._track(self.feed.move_epoch(user, epoch)))
        await asyncio.sleep(max(epoch - time.time(), 0.0))

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
        self._credit_changed()

    def _forget(self, identity: Identity) -> None:
        self.cache.invalidate(identity)
        if self.feed is not None:
            self.feed.changed(identity.key)

    def identity_changed(self, key: IdentityKey) -> None:
        self.cache.invalidate_key(key)
        self._credit_changed()

    def all_changed(self) -> None:
        self.cache.clear()
        self._credit_changed()

    def _credit_changed(self) -> None:
        # Credit changed outside a spend of this process (an admin grant, a host's own change,
        # another process heard on the feed): any event it wrote goes now, not at the next poll.
        if self.events is not None:
            self.events.delivery.wake()

    def token_revoked(self, digest: bytes, until: float) -> None:
        self.verifier.revoke_digest(digest, until)

    def epoch_moved(self, key: IdentityKey, epoch: float) -> None:
        self.verifier.move_epoch(key, epoch)

    def feed_down(self) -> None:
        self.feed_listening = False
        self.cache.limit_lifetime(min(FEED_DOWN_MAX_AGE_SECONDS, self.config.cache_ttl_seconds))

    def feed_up(self) -> None:
        self.feed_listening = True
        self.cache.limit_lifetime(None)

    async def spend(self, identity: Identity, idempotency_key: str, cost: int = 1) -> CreditStatus | None:
        """Take one use (or `cost`, from a provider with `weighted_spends`); returns the user's
        status right after it when the provider tells it (see `CreditProvider.spend`), else None."""
        if cost == 1:
            call = self.provider.spend(identity, idempotency_key)
        else:
            call = self.provider.spend_weighted(identity, idempotency_key, cost)
        return await self._take(call, identity, idempotency_key, "spend", cost)

    async def reserve(self, identity: Identity, idempotency_key: str, amount: int) -> CreditStatus | None:
        """Take up to `amount` for a cost known afterwards (`settle`); given back like a spend."""
        call = self.provider.reserve(identity, idempotency_key, amount)
        return await self._take(call, identity, idempotency_key, "reserve", amount)

    async def settle(self, identity: Identity, idempotency_key: str, cost: int, usage: Usage | None) -> None:
        """Keep `cost` of the reservation under this key and give the rest back; run to its end
        even if the caller goes away."""
        call = self.provider.settle(identity, idempotency_key, cost, usage)
        await asyncio.shield(
            self._track(self._change_credit(call, identity, "settle", idempotency_key, cost))
        )

    async def record_usage(self, identity: Identity, idempotency_key: str, usage: Usage) -> None:
        """Keep what the spend under this key was for; a failure is logged, never raised (the
        interaction it describes succeeded)."""
        try:
            await asyncio.shield(
                self._track(
                    self._guard(self.provider.record_usage(identity, idempotency_key, usage), "usage", object)
                )
            )
        except BillingError as exc:
            logger.warning(
                "Could not record the usage of request key %s: %s", idempotency_key, type(exc).__name__
            )

    async def _take(
        self, call: Awaitable[object], identity: Identity, idempotency_key: str, what: str, amount: int
    ) -> CreditStatus | None:
        change = self._change_credit(call, identity, what, idempotency_key, amount)
        # Started here when the provider allows: a spend on the loop finishes before anything could
        # cancel it, with no task.
        task = start_eagerly(change, self._track) if self.provider.eager_spends else self._track(change)
        try:
            status = await asyncio.shield(task)
        except (asyncio.CancelledError, ProviderUnavailable):
            # The caller went away while the use was being taken, or the spend failed in a way that
            # may have taken effect (a timeout after the backend committed): settle it in the
            # background once the spend's outcome is known.
            self._track(self._give_back_after(task, identity, idempotency_key, amount))
            raise
        return status if isinstance(status, CreditStatus) else None

    async def give_back(
        self, identity: Identity, idempotency_key: str, why: str = "asked by the host", *, amount: int = 1
    ) -> None:
        """Give back what was spent under this key (`amount`, what the spend took, is what the
        audit event says; the provider returns whatever the key took). When the provider cannot do it now
        (`ProviderUnavailable`), it is kept in the outbox and retried in the background until it
        can: never dropped. `why` is what `ciris-billing-proxy reconcile` shows for it meanwhile.

        The give-back and the decision to retry it run as one tracked task: a caller cancelled
        while it waits (a client gone, a host's timeout) cannot leave a failure unhandled."""
        await asyncio.shield(self._track(self._give_back_or_retry(identity, idempotency_key, why, amount)))

    async def _give_back_or_retry(self, identity: Identity, key: str, why: str, amount: int) -> None:
        try:
            await self._give_back_once(identity, key, amount)
        except ProviderUnavailable:
            await self._owe(identity, key, why)
        except BillingError:
            logger.warning("Could not give back the use spent under request key %s", key)

    async def _give_back_once(self, identity: Identity, key: str, amount: int) -> None:
        task = self._track(
            self._change_credit(self.provider.give_back(identity, key), identity, "give_back", key, amount)
        )
        await asyncio.shield(task)

    async def _owe(self, identity: Identity, key: str, why: str) -> None:
        """Keep the give-back durably first (a SIGTERM from now on cannot lose it), then retry it."""
        if self.outbox is not None:
            try:
                await self.outbox.owe(Owed(identity, key, why, time.time()))
            except Exception as exc:  # the record of a debt must never stop its retry below
                logger.error("Could not record the give-back for request key %s: %s", key, type(exc).__name__)
        if self.retries.schedule(identity, key):
            logger.warning(
                "Could not give back the use spent under request key %s yet; retrying in the background",
                key,
            )
        elif self.outbox is not None:
            logger.info("Shutting down: the give-back for request key %s is left to the next process", key)
        else:
            self.counts.give_backs_abandoned += 1

    def _take_over(self, owed: Owed) -> None:
        """A give-back the outbox claimed for this process (its own process stopped, or it was
        owed while none ran): made with the retries' backoff like any other."""
        self._taken_over[owed.slot] = owed
        self.retries.schedule(owed.identity, owed.request_key)

    async def _retry_give_back(self, identity: Identity, key: str) -> None:
        # Tracked as a whole: a retry stopped at shutdown mid-call still tells the outbox.
        await asyncio.shield(self._track(self._retry_once(identity, key)))

    async def _retry_once(self, identity: Identity, key: str) -> None:
        """One retry, and the outbox told once it is made (or never can be)."""
        slot = (identity.key, key)
        owed = self._taken_over.get(slot)
        call = (
            self.provider.give_back(identity, key)
            if owed is None
            else self.provider.give_back_owed(identity, key, owed.owed_since)
        )
        try:
            # What the spend took is not kept with a debt: the audit event's amount is left empty.
            await self._change_credit(call, identity, "give_back", key, None)
        except ProviderUnavailable:
            raise
        except BillingError as exc:
            logger.warning(
                "Gave up giving back the use spent under request key %s: %s", key, type(exc).__name__
            )
        self._taken_over.pop(slot, None)
        if self.outbox is not None:
            await self.outbox.made(slot)

    async def initiate_purchase(
        self,
        identity: Identity,
        return_url: str | None,
        idempotency_key: str | None,
        pack: str | None = None,
    ) -> PurchaseInitiated:
        """Start a purchase of `pack` (an id of the provider's `packs`; None: its default). An id it
        does not sell is an `InvalidRequest` naming those it does, before the provider is asked."""
        if pack is None:
            call = self.provider.initiate_purchase(identity, return_url, idempotency_key)
        else:
            packs = self.provider.packs
            if not any(offered.id == pack for offered in packs):
                raise InvalidRequest(unknown_pack(packs) if packs else NO_PACKS)
            call = self.provider.initiate_purchase(identity, return_url, idempotency_key, pack=pack)
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
            await self._purchase_succeeded(identity, payment_id, status)
        if status.status in ENDED and payment_id not in self._audited_payments:
            self._audited_payments[payment_id] = None
            kind = AuditKind.PURCHASE_SETTLED if status.status == "succeeded" else AuditKind.PURCHASE_FAILED
            outcome = "ok" if status.status == "succeeded" else status.status
            self.audit.record(
                kind, user_of(identity), outcome, amount=status.credits_added, reference=payment_id
            )
        return status

    async def _purchase_succeeded(self, identity: Identity, payment_id: str, status: PurchaseStatus) -> None:
        """`purchase.succeeded`, for a provider that writes no events of its own: once per payment
        whichever process sees it first (the outbox keeps one per payment id). A store that does not
        answer now loses nothing: the next status poll emits it."""
        events = self.events
        if events is None or not events.service_emits or payment_id in self._emitted_payments:
            return
        data = {
            "payment_id": payment_id,
            "credits_added": status.credits_added,
            "balance_after": status.balance_after,
        }
        emit = events.emit("purchase.succeeded", identity, data, once_key=f"purchase.succeeded:{payment_id}")
        try:
            await asyncio.shield(self._track(emit))
        except ProviderUnavailable:
            faults.warning(
                "Could not keep the purchase.succeeded event of a payment; the next status poll tries again"
            )
            return
        self._emitted_payments[payment_id] = None

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
                self._count_verification(what, outcome_of(exc))
                self.audit.record(
                    AuditKind.STORE_VERIFICATION, user_of(identity), _outcome(exc), reference=what
                )
                raise
            if result.success:
                self._forget(identity)
            self._count_verification(
                what,
                ("already_processed" if result.already_processed else "credited")
                if result.success
                else "refused",
            )
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

    def _count_verification(self, what: str, outcome: str) -> None:
        key = (what.removeprefix("verify_"), outcome)
        self.counts.verifications[key] = self.counts.verifications.get(key, 0) + 1

    async def _load_status(self, identity: Identity) -> CachedCredit:
        status = await self._guard(self.provider.credit_status(identity), "credit_status", CreditStatus)
        body = status.model_dump_json().encode()
        shared = self._interned.get(body)
        if shared is None:
            shared = self._interned[body] = CachedCredit(
                body, status.has_credit, _unix(status.next_expiry_at)
            )
        return shared

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        return await self._guard(
            self.provider.transactions(identity, limit, offset), "transactions", TransactionPage
        )

    # -- per-product credits (docs/tool-credits.md): not cached; each read asks the provider ----------
    async def product_balance(self, identity: Identity, product: str) -> ToolBalance:
        return await self._guard(
            self.provider.product_balance(identity, product), "product_balance", ToolBalance
        )

    async def product_balances(self, identity: Identity) -> list[ToolBalance]:
        balances = await self._guard(self.provider.product_balances(identity), "product_balances", list)
        if not all(isinstance(item, ToolBalance) for item in balances):
            logger.error("Credit provider %r returned a balance that is no ToolBalance", self.provider.name)
            raise ProviderUnavailable(maybe_applied=False)
        return balances

    async def product_check(self, identity: Identity, product: str) -> ToolCheck:
        return await self._guard(self.provider.product_check(identity, product), "product_check", ToolCheck)

    async def spend_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        """Take one use of `product`, as `spend` takes an interaction use: run to its end even if the
        caller goes away, and given back in the background when its outcome was ambiguous."""
        call = self._product_change(
            self.provider.spend_product(identity, product, idempotency_key),
            identity,
            "spend_product",
            f"{product}:{idempotency_key}",
        )
        task = self._track(call)
        try:
            await asyncio.shield(task)
        except (asyncio.CancelledError, ProviderUnavailable):
            self._track(self._give_back_product_after(task, identity, product, idempotency_key))
            raise

    async def give_back_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        """Give back the use of `product` spent under this key; a failure is logged with the key (the
        product's give-backs are not retried in the background)."""
        await asyncio.shield(self._track(self._give_back_product_once(identity, product, idempotency_key)))

    async def _give_back_product_once(self, identity: Identity, product: str, key: str) -> None:
        try:
            await self._product_change(
                self.provider.give_back_product(identity, product, key),
                identity,
                "give_back_product",
                f"{product}:{key}",
            )
        except BillingError:
            logger.warning("Could not give back the %s use spent under request key %s", product, key)

    async def _give_back_product_after(
        self, spend: asyncio.Task[Any], identity: Identity, product: str, key: str
    ) -> None:
        try:
            await spend
        except ProviderUnavailable as exc:
            if not exc.maybe_applied:
                return
        except BillingError:
            return
        await self._give_back_product_once(identity, product, key)

    async def verify_product_purchase(
        self, identity: Identity, purchase: ToolPurchaseRequest
    ) -> ToolPurchase:
        """A tool purchase, run to its end even if the app goes away (it adds credit); audited as a
        store verification with the tool in its reference (never the purchase token)."""
        call = self.provider.verify_product_purchase(identity, purchase)
        return await asyncio.shield(self._track(self._product_purchased(identity, purchase.tool_name, call)))

    async def _product_purchased(
        self, identity: Identity, tool: str, call: Awaitable[ToolPurchase]
    ) -> ToolPurchase:
        reference = f"verify_product_purchase:{tool}"
        try:
            result = await self._guard(call, "verify_product_purchase", ToolPurchase)
        except BillingError as exc:
            self.audit.record(
                AuditKind.STORE_VERIFICATION, user_of(identity), _outcome(exc), reference=reference
            )
            raise
        self.audit.record(
            AuditKind.STORE_VERIFICATION,
            user_of(identity),
            "ok" if result.success else "refused",
            amount=result.credits_added,
            reference=reference,
        )
        return result

    async def _product_change(
        self, call: Awaitable[object], identity: Identity, what: str, reference: str
    ) -> None:
        """A product's spend or give-back, audited as `spend` or `give_back` with `product:key` as
        its reference (products are not cached: nothing to forget)."""
        outcome = "failed"
        try:
            await self._guard(call, what, object)
            outcome = "ok"
        except InsufficientCredit:
            outcome = "refused"
            raise
        finally:
            kind = AuditKind.SPEND if what == "spend_product" else AuditKind.GIVE_BACK
            self.audit.record(kind, user_of(identity), outcome, amount=1, reference=reference)

    async def _change_credit(
        self, call: Awaitable[object], identity: Identity, what: str, key: str, amount: int | None = 1
    ) -> object:
        """Run a provider call that changes the user's credit (a spend or a give-back), forget
        the user's cached credit once it is done, whatever its outcome, and audit it; returns what
        it returned."""
        # The cache is dropped inside the tracked task, after the provider call: a caller's
        # cancellation cannot make it happen before the change and let a stale load be cached.
        outcome = "failed"
        try:
            result = await self._guard(call, what, object)
            outcome = "ok"
            return result
        except InsufficientCredit:
            outcome = "refused"
            raise
        finally:
            self._forget(identity)
            self.audit.record(
                self._audit_kind(what), user_of(identity), outcome, amount=amount, reference=key
            )
            if self.events is not None:
                self.events.delivery.wake()  # the change may have written an event (balance.low)

    def _audit_kind(self, what: str) -> AuditKind:
        if what in ("spend", "reserve"):
            return AuditKind.SPEND
        if what == "settle":
            return AuditKind.SETTLE
        # A provider that sells credits gives a use back by refunding what was charged for it.
        return AuditKind.REFUND if self.provider.purchases_enabled is True else AuditKind.GIVE_BACK

    async def _give_back_after(
        self, spend: asyncio.Future[object], identity: Identity, key: str, amount: int
    ) -> None:
        """Give back what `spend` took, if it may have taken anything. `give_back` is a no-op for a
        use never taken, so an ambiguous failure is reconciled with it too."""
        try:
            await spend
        except ProviderUnavailable as exc:
            if not exc.maybe_applied:
                return
        except BillingError:
            return  # refused outright (no credit): nothing was taken
        await self._give_back_or_retry(identity, key, "the spend failed, and may have taken effect", amount)

    async def _guard(self, call: Awaitable[Any], what: str, expected: type[T]) -> T:
        """The provider's answer, if it is what the interface declares; every failure other than
        a `BillingError` (a bug, a wrong return type) is logged and becomes `ProviderUnavailable`."""
        started = time.perf_counter()
        try:
            result = await call
        except BillingError as exc:
            self.counts.latencies.observe(what, outcome_of(exc), time.perf_counter() - started)
            raise
        except Exception:
            self.counts.latencies.observe(what, "error", time.perf_counter() - started)
            logger.exception("Credit provider %r failed in %s", self.provider.name, what)
            raise ProviderUnavailable from None
        self.counts.latencies.observe(
            what, "ok" if isinstance(result, expected) else "error", time.perf_counter() - started
        )
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
