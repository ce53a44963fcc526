"""Stripe, as the `stripe` provider calls it: the official library's async client over the package's
own aiohttp session, every call within the settings' budget, and every failure a `ProviderUnavailable`
(logged once, rate-limited, never with the key).

A PaymentIntent is made with an idempotency key of its own (the library retries with it), and its
metadata names the agent, the pack and the uses, so an operator finds a purchase in the Dashboard.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

import aiohttp
import stripe

from ...errors import ProviderUnavailable
from ...identity import Identity
from ...models import CreditPack
from ...ops.logs import FaultLog
from .settings import StripeSettings

T = TypeVar("T")

logger = logging.getLogger("ciris_billing_proxy.stripe")
faults = FaultLog(logger)

#: Connections to Stripe per process.
CONNECTIONS: Final = 20


class StripeAPI:
    def __init__(self, settings: StripeSettings, agent_id: str) -> None:
        self.settings = settings
        self.agent_id = agent_id
        self._session: aiohttp.ClientSession | None = None
        self._client: Any = None

    async def start(self) -> None:
        library = logging.getLogger("stripe")
        if library.level == logging.NOTSET:
            # The library logs each request with its URL at INFO; its failures reach the package's
            # own fault lines. A host that set the logger's level keeps its choice.
            library.setLevel(logging.WARNING)
        settings = self.settings
        timeout = aiohttp.ClientTimeout(
            total=settings.timeout_seconds, connect=min(5.0, settings.timeout_seconds)
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=CONNECTIONS),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        addresses = {"api": settings.api_base} if settings.api_base else None
        self._client = stripe.StripeClient(
            settings.secret_key.get_secret_value(),
            base_addresses=addresses,  # type: ignore[arg-type]
            http_client=stripe.AIOHTTPClient(session=self._session, timeout=timeout),
            max_network_retries=settings.max_retries,
        )

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def create_intent(self, identity: Identity, pack: CreditPack) -> Any:
        """A new PaymentIntent for `pack`, paid by card (Stripe.js's card element)."""
        params: dict[str, Any] = {
            "amount": pack.price_minor,
            "currency": pack.currency.lower(),
            "payment_method_types": ["card"],
            "description": f"{pack.uses} uses ({pack.id})",
            "metadata": {"ciris_agent": self.agent_id, "ciris_pack": pack.id, "ciris_uses": str(pack.uses)},
        }
        if identity.email:
            params["receipt_email"] = identity.email
        key = f"ciris-{secrets.token_hex(16)}"
        return await self._call(
            self._client.v1.payment_intents.create_async(params=params, options={"idempotency_key": key}),
            "create a PaymentIntent",
        )

    async def retrieve_intent(self, payment_id: str) -> Any:
        return await self._call(
            self._client.v1.payment_intents.retrieve_async(payment_id), "read a PaymentIntent"
        )

    async def health(self) -> None:
        """One read that changes nothing: the latest PaymentIntent (proves the key and the network)."""
        await self._call(
            self._client.v1.payment_intents.list_async(params={"limit": 1}), "list PaymentIntents"
        )

    async def _call(self, call: Awaitable[T], what: str) -> T:
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                return await call
        except TimeoutError:
            faults.warning("Stripe did not answer in time (%s)", what)
            raise ProviderUnavailable("Stripe timed out") from None
        except stripe.AuthenticationError:
            faults.error("Stripe refused the secret key (%s): check CIRIS_STRIPE_SECRET_KEY", what)
            raise ProviderUnavailable("Stripe refused the key", maybe_applied=False) from None
        except stripe.StripeError as exc:
            status = getattr(exc, "http_status", None)
            faults.warning("Stripe failed to %s: %s (HTTP %s)", what, type(exc).__name__, status)
            raise ProviderUnavailable("Stripe unavailable") from None
