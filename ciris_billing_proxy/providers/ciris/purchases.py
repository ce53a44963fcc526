"""Stripe purchases through the backend: starting one (once), and telling the truth about its status.

* Ownership: each payment started is recorded with its owner in the `PaymentStore`, because the
  backend does not check who asks about a payment.
* Starting: an `Idempotency-Key` replays the same user's reply for a day. A new key, or none, gets
  the user's latest payment back within `purchase_reuse_seconds`, but only while it still awaits
  payment; else a new one. Replies are kept in the `ReplayStore`, sealed (they carry the Stripe
  client secret), so every process sharing the database replays them. Every new PaymentIntent of a
  user is made under the store's one claim on the user's latest slot (a key's answer under the key's
  claim first), so simultaneous initiates of one user on any number of processes, with any keys,
  make one PaymentIntent at a time, and at most `purchase_max_per_user` per window. Within a process
  initiates with the same key (or none) share one task.
* Status: Stripe's `succeeded` is `processing` until the webhook's credit for *this* payment shows.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import suppress
from typing import Any, Final

from pydantic import ValidationError

from ...errors import InvalidRequest, PaymentNotFound, ProviderUnavailable, TooManyRequests
from ...identity import Identity
from ...models import PAYMENT_STATES, PurchaseInitiated, PurchaseStatus
from ...singleflight import SingleFlight
from ...store import Payment, PaymentStore
from ...store.replays import Found, ReplayStore, Slot, Taken
from ...store.sweeper import Sweeper
from .backend import BillingBackend
from .sealing import ReplySeal
from .wire import AWAITING_PAYMENT, BLOCKED, BackendPurchase, to_credit_status

logger = logging.getLogger("ciris_billing_proxy.ciris")

EMAIL_REQUIRED: Final = "Email address required for purchase"
TOO_MANY_PURCHASES: Final = "Too many purchases started; try again later"
INVALID_PURCHASE: Final = "Invalid purchase request"
#: How long an `Idempotency-Key` replays its reply.
KEY_REPLAY_SECONDS: Final = 86_400.0
#: A claim outlives the longest start (the purchase budget, a second's wait for a replayed
#: PaymentIntent, the ownership write) by this much; a process that dies holding one delays the
#: user's next purchase by its lease at most.
CLAIM_MARGIN_SECONDS: Final = 15.0
#: How often a click waiting for another process's start looks again.
CLAIM_POLL_SECONDS: Final = 0.05


class PurchaseDesk:
    def __init__(
        self, backend: BillingBackend, payments: PaymentStore, replays: ReplayStore, seal: ReplySeal
    ) -> None:
        self.backend = backend
        self.payments = payments
        self.replays = replays
        self._seal = seal
        self._lease = backend.settings.purchase_timeout_seconds + CLAIM_MARGIN_SECONDS
        self._starting: SingleFlight[tuple[tuple[str, str], str | None], PurchaseInitiated] = SingleFlight()
        self._sweeper = Sweeper(replays.sweep, "purchase replays")

    def start(self) -> None:
        self._sweeper.start()

    async def aclose(self) -> None:
        await self._sweeper.aclose()
        await self._starting.aclose()

    async def initiate(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None
    ) -> PurchaseInitiated:
        if not identity.email:
            raise InvalidRequest(EMAIL_REQUIRED)
        task = self._starting.run(
            (identity.key, idempotency_key), lambda: self._once(identity, return_url, idempotency_key)
        )
        return await asyncio.shield(task)

    async def _once(
        self, identity: Identity, return_url: str | None, idempotency_key: str | None
    ) -> PurchaseInitiated:
        """Without a key, the user's latest purchase (`_latest_or_new`). With one, the key's reply if
        it has one, else what `_latest_or_new` gives, kept as the key's reply: made under the key's
        claim, so one key is one answer however many processes are asked at once."""
        if idempotency_key is None:
            return await self._latest_or_new(identity, return_url)
        slot = Slot(identity.namespace, identity.user_id, idempotency_key)
        token = secrets.token_hex(16)
        give_up = time.monotonic() + self._lease + 1.0
        unreadable: str | None = None
        while True:
            claim = await self.replays.claim(slot, token, self._lease, unreadable)
            if isinstance(claim, Taken):
                return await self._answer_key(identity, return_url, slot, token)
            if isinstance(claim, Found):
                purchase = self._open(slot, claim)
                if purchase is not None:
                    return purchase
                unreadable = claim.payment_id  # a reply that no longer opens is replaced
                continue
            await self._wait(give_up)

    async def _answer_key(
        self, identity: Identity, return_url: str | None, slot: Slot, token: str
    ) -> PurchaseInitiated:
        try:
            purchase = await self._latest_or_new(identity, return_url)
            body = self._seal_for(slot, purchase.model_dump_json().encode())
            if not await self.replays.fill(slot, token, purchase.payment_id, body, KEY_REPLAY_SECONDS):
                logger.warning("Payment %s took longer than its claim to start", purchase.payment_id)
        except BaseException:
            with suppress(ProviderUnavailable):
                await self.replays.release(slot, token)
            raise
        return purchase

    async def _latest_or_new(self, identity: Identity, return_url: str | None) -> PurchaseInitiated:
        """The user's latest purchase while it awaits payment and is within `purchase_reuse_seconds`,
        else a new one, made under the claim on the user's latest slot. Every new PaymentIntent of a
        user is made under that one claim, with or without a key, in every process: one at a time,
        so the backend (whose Stripe idempotency key is the account and the second) never hands
        two of them one PaymentIntent, and the per-user limit counts exactly."""
        slot = Slot(identity.namespace, identity.user_id, None)
        token = secrets.token_hex(16)
        give_up = time.monotonic() + self._lease + 1.0
        superseding: str | None = None
        while True:
            claim = await self.replays.claim(slot, token, self._lease, superseding)
            if isinstance(claim, Taken):
                return await self._start_claimed(identity, return_url, slot, token)
            if isinstance(claim, Found):
                purchase = self._open(slot, claim)
                if purchase is not None and await self._awaits_payment(purchase.payment_id):
                    return purchase
                superseding = claim.payment_id
                continue
            await self._wait(give_up)

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
                "A kept purchase reply does not open (sealed with another API key or replay secret: "
                "see docs/operations.md, Rotating the backend API key); starting anew"
            )
            return None
        return PurchaseInitiated.model_validate_json(plain)

    async def _start_claimed(
        self, identity: Identity, return_url: str | None, slot: Slot, token: str
    ) -> PurchaseInitiated:
        try:
            await self._within_limit(identity)
            purchase = await self._start(identity, return_url)
            body = self._seal_for(slot, purchase.model_dump_json().encode())
            if not await self.replays.fill(slot, token, purchase.payment_id, body, self._reuse_seconds):
                logger.warning("Payment %s took longer than its claim to start", purchase.payment_id)
        except BaseException:
            # Others waiting on the claim then try themselves instead of waiting out its lease.
            with suppress(ProviderUnavailable):
                await self.replays.release(slot, token)
            raise
        return purchase

    async def _within_limit(self, identity: Identity) -> None:
        """At most `purchase_max_per_user` new PaymentIntents per user per `purchase_window_seconds`
        (counted in the payment records, shared by every process): beyond it, a 429 whose
        `Retry-After` is when the oldest of them leaves the window. Called under the user's latest
        claim, so the count cannot race with another start of the user's."""
        settings = self.backend.settings
        if not settings.purchase_max_per_user:
            return
        now = time.time()
        started = await self.payments.started_since(identity, now - settings.purchase_window_seconds)
        if len(started) >= settings.purchase_max_per_user:
            oldest = started[len(started) - settings.purchase_max_per_user]
            raise TooManyRequests(TOO_MANY_PURCHASES, oldest + settings.purchase_window_seconds - now)

    def _seal_for(self, slot: Slot, body: bytes) -> bytes:
        return self._seal.seal(body, slot.binding())

    @property
    def _reuse_seconds(self) -> float:
        return self.backend.settings.purchase_reuse_seconds

    async def _awaits_payment(self, payment_id: str) -> bool:
        """Whether a payment can still be handed back for a double click: only one still waiting
        for the user to pay. One that succeeded, failed or was canceled cannot be paid again, so
        the next click must get a new one; when its state cannot be read, so must it."""
        payment = await self.payments.get(payment_id)
        if payment is None or payment.credited:
            return False
        deadline = self.backend.deadline(self.backend.settings.timeout_seconds)
        try:
            reply = await self.backend.stripe_status(payment_id, deadline)
        except ProviderUnavailable:
            return False
        return reply.status == 200 and reply.body.get("status") in AWAITING_PAYMENT

    async def _start(self, identity: Identity, return_url: str | None) -> PurchaseInitiated:
        backend = self.backend
        deadline = backend.deadline(backend.settings.purchase_timeout_seconds)
        # A fresh check first: it creates the account the right way (10 free uses; a purchase would
        # create it with 3), refuses suspended or closed accounts (the backend would sell to them),
        # and gives the paid balance against which the webhook's credits are seen.
        before = await backend.check(identity, deadline)
        if before.reason in BLOCKED:
            raise InvalidRequest(f"{before.reason}: purchases are not possible")
        body = backend.accounts.of(identity)
        if return_url:
            body["return_url"] = return_url
        bought = await self._new_payment_intent(body, deadline)
        if await self._replayed(bought):
            # The backend's Stripe idempotency key is `purchase-v3-{account}-{unix second}`: a
            # purchase in the same second as the last one gets that PaymentIntent back, even when
            # it has already been paid. A call a whole second after that reply is in a later second
            # of the backend's clock, whatever its skew from ours, so it makes a new one.
            await asyncio.sleep(1.0)
            bought = await self._new_payment_intent(body, deadline)
            if await self._replayed(bought):
                # Our own starts are one at a time per user (`_latest_or_new`): this is another
                # client of the same backend account, or a backend clock far off. WARNING: a user
                # cannot make it happen at will, but it is no fault of this process either.
                logger.warning("Billing backend purchases answered a PaymentIntent that cannot be paid")
                raise ProviderUnavailable("purchase replayed an ended payment", maybe_applied=False)
        publishable_key = bought.publishable_key or backend.settings.stripe_publishable_key
        if not publishable_key:
            logger.error(
                "No Stripe publishable key: the backend sent none and STRIPE_PUBLISHABLE_KEY is unset"
            )
            raise ProviderUnavailable("no publishable key", maybe_applied=False)
        await self.payments.record(
            bought.payment_id,
            identity,
            uses=bought.uses_purchased,
            amount_minor=bought.amount_minor,
            currency=bought.currency,
            balance_before=max(before.credits_remaining, 0),
        )
        return PurchaseInitiated(
            payment_id=bought.payment_id,
            client_secret=bought.client_secret,
            amount_minor=bought.amount_minor,
            currency=bought.currency,
            uses_purchased=bought.uses_purchased,
            publishable_key=publishable_key,
        )

    async def _new_payment_intent(self, body: dict[str, Any], deadline: float) -> BackendPurchase:
        reply = await self.backend.purchase(body, deadline)
        if reply.status == 400:
            raise InvalidRequest(INVALID_PURCHASE)
        if reply.status != 201:
            raise self.backend.unexpected("purchases", reply)  # a 422 means this proxy sent a bad body
        try:
            return BackendPurchase.model_validate(reply.body)
        except ValidationError:
            logger.error("Billing backend purchases answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed purchase") from None

    async def _replayed(self, bought: BackendPurchase) -> bool:
        """Whether the backend handed back a PaymentIntent it had made before. Stripe replays the
        creation reply (status included) for a repeated idempotency key, so a payment this proxy
        already recorded is the surest sign; a status that cannot be paid is another."""
        return bought.status not in AWAITING_PAYMENT or await self.payments.get(bought.payment_id) is not None

    async def status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        payment = await self.payments.get(payment_id)
        if payment is None or not payment.owned_by(identity):
            raise PaymentNotFound
        if payment.credited:
            assert payment.balance_after is not None
            return PurchaseStatus(
                status="succeeded", credits_added=payment.uses, balance_after=payment.balance_after
            )
        # The status call reaches Stripe synchronously: it gets the purchase budget, shared with
        # the checks that may follow it.
        deadline = self.backend.deadline(self.backend.settings.purchase_timeout_seconds)
        reply = await self.backend.stripe_status(payment_id, deadline)
        if reply.status != 200:
            # We created this payment, so a 404 here is the backend's Stripe error, not a bad id.
            raise self.backend.unexpected("purchase_status", reply)
        stripe_status = reply.body.get("status")
        if stripe_status != "succeeded":
            state = stripe_status if stripe_status in PAYMENT_STATES else "unknown"
            return PurchaseStatus.model_validate({"status": state})
        return await self._succeeded_once_credited(identity, payment, deadline)

    async def _succeeded_once_credited(
        self, identity: Identity, payment: Payment, deadline: float
    ) -> PurchaseStatus:
        """Stripe says succeeded; answer succeeded only once *this payment's* credits show.

        The webhook's credit names the payment (`external_transaction_id`), which is exact even
        when other credits arrive or the user spends meanwhile. Only a backend without the
        transactions listing falls back to the balance having grown by the uses bought."""
        backend = self.backend
        credited = await backend.find_transaction(
            identity,
            "credit",
            lambda t: t.get("external_transaction_id") == payment.payment_id,
            deadline=deadline,
        )
        now = await backend.check(identity, deadline)
        landed = credited is not None or (
            backend.listing_missing and now.credits_remaining >= payment.balance_before + payment.uses
        )
        if landed:
            shown = to_credit_status(now).credits_remaining  # what /credits shows from now on
            balance = await self.payments.mark_credited(payment.payment_id, shown)
            return PurchaseStatus(status="succeeded", credits_added=payment.uses, balance_after=balance)
        first_seen = await self.payments.seen_succeeded(payment.payment_id)
        wait = backend.settings.credit_wait_seconds
        if time.time() - first_seen > wait:
            logger.error(
                "Payment %s succeeded at Stripe but its credits have not landed after %.0f s",
                payment.payment_id,
                wait,
            )
            return PurchaseStatus(status="unknown")
        return PurchaseStatus(status="processing")
