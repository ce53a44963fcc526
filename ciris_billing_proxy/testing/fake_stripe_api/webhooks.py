"""The fake Stripe's webhook endpoint: each event POSTed to the agent, signed as Stripe signs them
(`Stripe-Signature: t=<unix>,v1=<HMAC-SHA256(secret, "<t>.<body>")>`), with the faults a real
delivery has: late, more than once, out of order, lost, or failing and retried.

    hooks = fake.webhooks
    hooks.url = "http://127.0.0.1:8080/v1/api/billing/stripe/webhook"
    hooks.delay = 1.0          # each event waits this long before it is sent
    hooks.copies = 5           # each event is sent this many times
    hooks.hold()               # keep events back ...
    hooks.release("reverse")   # ... and send them newest first ("shuffle": in a random order)
    hooks.drop(2)              # the next two events are never sent (as if lost for good)
    hooks.fail(3)              # the next three attempts do not reach the agent; retried later
    await hooks.idle()         # every delivery so far has ended
    hooks.deliveries           # (event id, type, HTTP status or 0 for a failed attempt), in order
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass
from typing import Final, Literal

import aiohttp

from .state import Event

SIGNATURE_HEADER: Final = "Stripe-Signature"


def signature(secret: str, payload: bytes, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header Stripe sends with `payload` at `timestamp` (default now)."""
    moment = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{moment}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={moment},v1={mac}"


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: str
    type: str
    status: int


class WebhookSender:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        #: Where events go; None sends nothing (events are still kept and listed by the API).
        self.url: str | None = None
        self.delay = 0.0
        self.copies = 1
        #: Attempts per send before Stripe gives up (a real one retries for days).
        self.max_attempts = 4
        self.retry_seconds = 0.2
        self.deliveries: list[Delivery] = []
        self._held: list[Event] | None = None
        self._dropping = 0
        self._failing = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def hold(self) -> None:
        """Keep new events back until `release`."""
        if self._held is None:
            self._held = []

    def release(self, order: Literal["as_is", "reverse", "shuffle"] = "as_is") -> None:
        held, self._held = self._held or [], None
        if order == "reverse":
            held.reverse()
        elif order == "shuffle":
            random.shuffle(held)
        for event in held:
            self._schedule(event, delay=0.0)

    def drop(self, events: int) -> None:
        self._dropping += events

    def fail(self, attempts: int) -> None:
        self._failing += attempts

    def __call__(self, event: Event) -> None:
        if self.url is None:
            return
        if self._dropping:
            self._dropping -= 1
            return
        if self._held is not None:
            self._held.append(event)
            return
        self._schedule(event, self.delay)

    def resend(self, event: Event) -> None:
        """Send an event again, as the Dashboard's "Resend" does."""
        self._schedule(event, delay=0.0, copies=1)

    async def idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _schedule(self, event: Event, delay: float, copies: int | None = None) -> None:
        for _ in range(self.copies if copies is None else copies):
            task = asyncio.ensure_future(self._send(event, delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, event: Event, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        payload = json.dumps(event.view(), indent=2).encode()  # Stripe's payloads are indented too
        for attempt in range(self.max_attempts):
            if attempt:
                await asyncio.sleep(self.retry_seconds * 2 ** (attempt - 1))
            status = await self._attempt(payload)
            self.deliveries.append(Delivery(event.id, event.type, status))
            if 200 <= status < 300:
                return

    async def _attempt(self, payload: bytes) -> int:
        if self._failing:
            self._failing -= 1
            return 0
        assert self._session is not None
        assert self.url is not None
        headers = {
            SIGNATURE_HEADER: signature(self.secret, payload),
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        try:
            async with self._session.post(self.url, data=payload, headers=headers) as reply:
                await reply.read()
                return reply.status
        except (aiohttp.ClientError, TimeoutError):
            return 0
