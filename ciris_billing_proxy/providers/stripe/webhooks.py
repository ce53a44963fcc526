"""`POST {prefix}/stripe/webhook`: Stripe's signed events, verified with the library and handled once.

* The signature (`Stripe-Signature: t=...,v1=...`) is checked by `stripe.WebhookSignature` against the
  webhook secret, in constant time, and refused when older than the tolerance (300 s by default): a
  forged, stale or unsigned body is a 400 and changes nothing.
* Stripe delivers each event at least once and in any order. An event already handled (its id is in
  the store) is answered 200 and changes nothing; a new one is handled, then recorded. What each does
  is idempotent whatever the order (a credit is once per payment, a clawback raises what a payment
  has had taken back to what its charge now says), so two deliveries racing on two processes are
  harmless too.
* An event this agent does not act on, or about a payment it did not start, is answered 200 and
  ignored, as Stripe asks (else it retries for days). A failure to handle one (the database or Stripe
  down) is a 503: nothing is recorded, and Stripe sends it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import stripe
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...bodies import read_body
from ...errors import ProviderUnavailable, http_error
from ...identity import Identity
from ...keys import billing_service
from ...operations import EXPECT_FAILED, Operation
from ...ops.audit import AuditKind, user_of
from ...ops.logs import FaultLog
from ...store.stripe_events import StripeEventStore

if TYPE_CHECKING:
    from ...service import BillingService

logger = logging.getLogger("ciris_billing_proxy.stripe")
faults = FaultLog(logger)

#: Stripe's events are a few kilobytes; a body beyond this is no event of theirs.
MAX_EVENT_BYTES: Final = 256 * 1024
BODY_SECONDS: Final = 10.0
BAD_SIGNATURE: Final = "Invalid Stripe signature"
NOT_CONFIGURED: Final = "Stripe webhooks are not configured (CIRIS_STRIPE_WEBHOOK_SECRET)"


class WebhookReceived(BaseModel):
    """The webhook's 200: `duplicate` when the event was handled before, `ignored` when this agent
    does not act on it (another kind of event, or a payment it did not start)."""

    model_config = ConfigDict(frozen=True)

    received: bool = True
    duplicate: bool = False
    ignored: bool = False


WEBHOOK: Final = Operation(
    "stripeWebhook",
    "POST",
    "/stripe/webhook",
    "Stripe's events (the `stripe` provider): signed with the webhook secret (`Stripe-Signature`), not "
    "the bearer token. Point a Stripe webhook endpoint here with the events `payment_intent.succeeded`, "
    "`payment_intent.payment_failed`, `payment_intent.canceled`, `charge.refunded` and "
    "`charge.dispute.created`.",
    WebhookReceived,
    {
        400: "a missing, forged or stale signature, a body that is no Stripe event, or no webhook secret "
        "configured: nothing changed",
        408: "the body did not arrive in time",
        413: "the body is larger than an event can be",
        417: EXPECT_FAILED,
        503: "the event could not be handled now (database or Stripe down): Stripe sends it again",
    },
    "stripe",
    bearer=False,
)


class EventData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    object: dict[str, Any]


class StripeEvent(BaseModel):
    """The part of a Stripe event (`/v1/events`) the provider reads."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=255)
    type: str = Field(min_length=1, max_length=255)
    created: int
    data: EventData


def verified_event(payload: bytes, header: str | None, secret: str, tolerance: int) -> StripeEvent | None:
    """The event, if `header` is Stripe's signature of `payload` with `secret`, made within
    `tolerance` seconds; else None."""
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
        return StripeEvent.model_validate_json(payload)
    except (stripe.SignatureVerificationError, ValueError, ValidationError):
        return None


@dataclass(frozen=True, slots=True)
class Handled:
    """What handling an event came to: the payment's owner when it may have changed their credit
    (their cached credit is then dropped in every process), and whether this agent acts on it."""

    owner: Identity | None = None
    payment_id: str | None = None
    acted: bool = True
    #: Uses a refund or dispute took back, and those it could not (now owed).
    clawed: int = 0
    owed: int = 0


Handle = Callable[[StripeEvent], Awaitable[Handled]]


class WebhookRoute:
    def __init__(self, secret: str | None, tolerance: int, events: StripeEventStore, handle: Handle) -> None:
        self._secret = secret
        self._tolerance = tolerance
        self._events = events
        self._handle = handle
        self._running: set[asyncio.Task[Handled]] = set()

    async def aclose(self) -> None:
        """Let handlings under way finish (they move money), at shutdown."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def receive(self, request: web.Request) -> web.Response:
        service = billing_service(request)
        if self._secret is None:
            faults.warning("A Stripe webhook arrived but CIRIS_STRIPE_WEBHOOK_SECRET is not set: refused")
            raise http_error(400, NOT_CONFIGURED)
        payload = await read_body(request, MAX_EVENT_BYTES, time_limit=BODY_SECONDS)
        event = verified_event(
            payload, request.headers.get("Stripe-Signature"), self._secret, self._tolerance
        )
        if event is None:
            faults.warning("Refused a Stripe webhook: missing, forged or stale signature")
            _count(service, "refused")
            service.audit.record(AuditKind.STRIPE_WEBHOOK, None, "refused")
            raise http_error(400, BAD_SIGNATURE)
        if await self._events.seen(event.id):
            _count(service, "duplicate")
            service.audit.record(AuditKind.STRIPE_WEBHOOK, None, "duplicate", reference=event.id)
            return _reply(WebhookReceived(duplicate=True))
        # Run to its end even if Stripe hangs up meanwhile: it may be moving credit.
        task = asyncio.ensure_future(self._handle(event))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            handled = await asyncio.shield(task)
        except ProviderUnavailable:
            _count(service, "failed")
            service.audit.record(AuditKind.STRIPE_WEBHOOK, None, "failed", reference=event.id)
            raise
        await self._events.record(event.id, event.type, handled.payment_id)
        if handled.owner is not None:
            service.invalidate(handled.owner)
        user = None if handled.owner is None else user_of(handled.owner)
        _count(service, "ok" if handled.acted else "ignored")
        service.audit.record(
            AuditKind.STRIPE_WEBHOOK, user, "ok" if handled.acted else "ignored", reference=event.id
        )
        if handled.clawed:
            service.audit.record(
                AuditKind.CLAWBACK, user, "ok", amount=handled.clawed, reference=handled.payment_id
            )
        if handled.owed:
            service.audit.record(
                AuditKind.CLAWBACK, user, "owed", amount=handled.owed, reference=handled.payment_id
            )
        return _reply(WebhookReceived(ignored=not handled.acted))


def _count(service: BillingService, outcome: str) -> None:
    webhooks = service.counts.webhooks
    webhooks[outcome] = webhooks.get(outcome, 0) + 1


def _reply(body: WebhookReceived) -> web.Response:
    return web.Response(body=body.model_dump_json().encode(), content_type="application/json")
