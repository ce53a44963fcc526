"""Starting Stripe purchases once, for any provider that sells them (`ciris`, `stripe`).

* An `Idempotency-Key` replays the same user's reply for a day. A new key, or none, gets the user's
  latest payment back within `reuse_seconds` (a double click), but only while it still awaits payment
  and is of the pack asked for; else a new one. Replies are kept in the `ReplayStore`, sealed (they
  carry the Stripe client secret), so every process sharing the database replays them.
* Every new PaymentIntent of a user is made under the store's one claim on the user's latest slot (a
  key's answer under the key's claim first), so simultaneous initiates of one user on any number of
  processes, with any keys, make one PaymentIntent at a time, and at most `max_per_user` per
  `window_seconds`. Within a process initiates with the same key (or none) and pack share one task.

What a purchase is, is the `Seller`'s: it makes the PaymentIntent (and records its owner in the
`PaymentStore`), and says whether one can still be paid.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Final, Protocol

from ..errors import ProviderUnavailable, TooManyRequests
from ..identity import Identity
from ..models import PurchaseInitiated
from ..singleflight import SingleFlight
from ..store import PaymentStore
from ..store.replays import Found, ReplayStore, Slot, Taken
from ..store.sweeper import Sweeper
from .ciris.sealing import ReplySeal

logger = logging.getLogger("ciris_billing_proxy")

TOO_MANY_PURCHASES: Final = "Too many purchases started; try again later"
#: How long an `Idempotency-Key` replays its reply.
KEY_REPLAY_SECONDS: Final = 86_400.0
#: A claim outlives the longest start (the seller's budget, a second's wait for a replayed
#: PaymentIntent, the ownership write) by this much; a process that dies holding one delays the
#: user's next purchase by its lease at most.
CLAIM_MARGIN_SECONDS: Final = 15.0
#: How often a click waiting for another process's start looks again.
CLAIM_POLL_SECONDS: Final = 0.05


class Seller(Protocol):
    async def start_purchase(
        self, identity: Identity, return_url: str | None, pack: str | None
    ) -> PurchaseInitiated:
        """A new PaymentIntent of `pack` (None: the default), its owner recorded in the payments."""
        ...

    async def awaits_payment(self, purchase: PurchaseInitiated, pack: str | None) -> bool:
        """Whether `purchase` is of `pack` and can still be paid: only then is it handed back for a
        double click. When its state cannot be read, False (the click gets a new one)."""
        ...


@dataclass(frozen=True, slots=True)
class StartLimits:
    #: The longest a start takes (its budget): a claim lasts this plus `CLAIM_MARGIN_SECONDS`.
    start_seconds: float
    #: A purchase started by the same user this recently is returned again instead of a new one.
    reuse_seconds: float
    #: New PaymentIntents one user may start per `window_seconds` (0: no limit).
    max_per_user: int
    window_seconds: float


class PurchaseStarts:
    def __init__(
        self,
        seller: Seller,
        payments: PaymentStore,
        replays: ReplayStore,
        seal: ReplySeal,
        limits: StartLimits,
    ) -> None:
        self.seller = seller
        self.payments = payments
        self.replays = replays
        self._seal = seal
        self.limits = limits
        self._lease = limits.start_seconds + CLAIM_MARGIN_SECONDS
        self._starting: SingleFlight[tuple[tuple[str, str], str | None, str | None], PurchaseInitiated] = (
            SingleFlight()
        )
        self._sweeper = Sweeper(replays.sweep, "purchase replays")

    def start(self) -> None:
        self._sweeper.start()

    async def aclose(self) -> None:
        await self._sweeper.aclose()
        await self._starting.aclose()

    async def initiate(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None, pack: str | None = None
    ) -> PurchaseInitiated:
        task = self._starting.run(
            (identity.key, idempotency_key, pack),
            lambda: self._once(identity, return_url, idempotency_key, pack),
        )
        return await asyncio.shield(task)

    async def _once(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None, pack: str | None
    ) -> PurchaseInitiated:
        """Without a key, the user's latest purchase (`_latest_or_new`). With one, the key's reply if
        it has one, else what `_latest_or_new` gives, kept as the key's reply: made under the key's
        claim, so one key is one answer however many processes are asked at once."""
        if idempotency_key is None:
            return await self._latest_or_new(identity, return_url, pack)
        slot = Slot(identity.namespace, identity.user_id, idempotency_key)
        token = secrets.token_hex(16)
        give_up = time.monotonic() + self._lease + 1.0
        unreadable: str | None = None
        while True:
            claim = await self.replays.claim(slot, token, self._lease, unreadable)
            if isinstance(claim, Taken):
                return await self._answer_key(identity, return_url, slot, token, pack)
            if isinstance(claim, Found):
                purchase = self._open(slot, claim)
                if purchase is not None:
                    return purchase
                unreadable = claim.payment_id  # a reply that no longer opens is replaced
                continue
            await self._wait(give_up)

    async def _answer_key(
        self, identity: Identity, return_url: str | None, slot: Slot, token: str, pack: str | None
    ) -> PurchaseInitiated:
        try:
            purchase = await self._latest_or_new(identity, return_url, pack)
            body = self._seal.seal(purchase.model_dump_json().encode(), slot.binding())
            if not await self.replays.fill(slot, token, purchase.payment_id, body, KEY_REPLAY_SECONDS):
                logger.warning("Payment %s took longer than its claim to start", purchase.payment_id)
        except BaseException:
            with suppress(ProviderUnavailable):
                await self.replays.release(slot, token)
            raise
        return purchase

    async def _latest_or_new(
        self, identity: Identity, return_url: str | None, pack: str | None
    ) -> PurchaseInitiated:
        """The user's latest purchase while it awaits payment, is of `pack` and is within
        `reuse_seconds`, else a new one, made under the claim on the user's latest slot. Every new
        PaymentIntent of a user is made under that one claim, with or without a key, in every
        process: one at a time, so the per-user limit counts exactly."""
        slot = Slot(identity.namespace, identity.user_id, None)
        token = secrets.token_hex(16)
        give_up = time.monotonic() + self._lease + 1.0
        superseding: str | None = None
        while True:
            claim = await self.replays.claim(slot, token, self._lease, superseding)
            if isinstance(claim, Taken):
                return await self._start_claimed(identity, return_url, slot, token, pack)
            if isinstance(claim, Found):
                purchase = self._open(slot, claim)
                if purchase is not None and await self._reusable(purchase, pack):
                    return purchase
                superseding = claim.payment_id
                continue
            await self._wait(give_up)

    async def _reusable(self, purchase: PurchaseInitiated, pack: str | None) -> bool:
        payment = await self.payments.get(purchase.payment_id)
        if payment is None or payment.credited:
            return False
        return await self.seller.awaits_payment(purchase, pack)

    @staticmethod
    async def _wait(give_up: float) -> None:
        """Wait a poll for a claim held elsewhere; past `give_up` (its holder died, and its lease has
        not run out yet), a 503 that made nothing."""
        if time.monotonic() > give_up:
            raise ProviderUnavailable("another process is still starting it", maybe_applied=False)
        await asyncio.sleep(CLAIM_POLL_SECONDS)

    def _open(self, slot: Slot, found: Found) -> PurchaseInitiated | None:
        plain = self._seal.open(found.sealed, slot.binding())
        if plain is None:
            logger.warning(
                "A kept purchase reply does not open (sealed with another key or replay secret: "
                "see docs/operations.md, Rotating the backend API key); starting anew"
            )
            return None
        return PurchaseInitiated.model_validate_json(plain)

    async def _start_claimed(
        self, identity: Identity, return_url: str | None, slot: Slot, token: str, pack: str | None
    ) -> PurchaseInitiated:
        try:
            await self._within_limit(identity)
            purchase = await self.seller.start_purchase(identity, return_url, pack)
            body = self._seal.seal(purchase.model_dump_json().encode(), slot.binding())
            if not await self.replays.fill(slot, token, purchase.payment_id, body, self.limits.reuse_seconds):
                logger.warning("Payment %s took longer than its claim to start", purchase.payment_id)
        except BaseException:
            # Others waiting on the claim then try themselves instead of waiting out its lease.
            with suppress(ProviderUnavailable):
                await self.replays.release(slot, token)
            raise
        return purchase

    async def _within_limit(self, identity: Identity) -> None:
        """At most `max_per_user` new PaymentIntents per user per `window_seconds` (counted in the
        payment records, shared by every process): beyond it, a 429 whose `Retry-After` is when the
        oldest of them leaves the window. Called under the user's latest claim, so the count cannot
        race with another start of the user's."""
        limits = self.limits
        if not limits.max_per_user:
            return
        now = time.time()
        started = await self.payments.started_since(identity, now - limits.window_seconds)
        if len(started) >= limits.max_per_user:
            oldest = started[len(started) - limits.max_per_user]
            raise TooManyRequests(TOO_MANY_PURCHASES, oldest + limits.window_seconds - now)
