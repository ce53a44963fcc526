"""An agent on the `stripe` provider against the fake Stripe API, both real servers on loopback: the
official `stripe` library talks to the fake, and the fake's signed webhooks come back to the agent."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from ciris_billing_proxy import BillingConfig, BillingService, Identity
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.providers.stripe import StripeProvider
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.testing.fake_stripe_api import FakeStripeAPI

from .conftest import ClientFactory, make_config
from .default_paths import BILLING as PREFIX

WEBHOOK = PREFIX + "/stripe/webhook"
PACKS = [
    {"id": "small", "uses": 20, "price_minor": 500, "currency": "usd"},
    {"id": "big", "uses": 100, "price_minor": 2000, "currency": "usd"},
]


def stripe_config(
    tmp_path: Path, fake: FakeStripeAPI, *, config: dict[str, Any] | None = None, **options: Any
) -> BillingConfig:
    """A config of the `stripe` provider on `fake`: `options` are the provider's, `config` the rest."""
    settings: dict[str, Any] = {
        "secret_key": fake.secret_key,
        "publishable_key": fake.publishable_key,
        "webhook_secret": fake.webhook_secret,
        "api_base": fake.url,
        "packs": PACKS,
        "database": ":memory:",
        "max_retries": 0,
        **options,
    }
    return make_config(tmp_path, provider="stripe", provider_options=settings, **(config or {}))


@dataclass
class Agent:
    client: TestClient[web.Request, web.Application]
    tokens: TokenFactory
    fake: FakeStripeAPI

    @property
    def service(self) -> BillingService:
        return self.client.app[SERVICE_KEY]

    @property
    def provider(self) -> StripeProvider:
        provider = self.service.provider
        assert isinstance(provider, StripeProvider)
        return provider

    def headers(self, user: str = "ann") -> dict[str, str]:
        return self.tokens.headers(user, email=f"{user}@example.com")

    def identity(self, user: str = "ann") -> Identity:
        return Identity(user_id=user, namespace="local", role="user")

    def webhook_url(self) -> str:
        return str(self.client.make_url(WEBHOOK))

    async def get(self, path: str, user: str = "ann") -> tuple[int, Any]:
        resp = await self.client.get(PREFIX + path, headers=self.headers(user))
        return resp.status, await resp.json()

    async def initiate(self, user: str = "ann", **body: Any) -> dict[str, Any]:
        resp = await self.client.post(PREFIX + "/purchase/initiate", headers=self.headers(user), json=body)
        assert resp.status == 200, await resp.text()
        reply: dict[str, Any] = await resp.json()
        return reply

    async def status(self, payment_id: str, user: str = "ann") -> dict[str, Any]:
        code, body = await self.get(f"/purchase/status/{payment_id}", user)
        assert code == 200, body
        reply: dict[str, Any] = body
        return reply

    async def credits(self, user: str = "ann") -> dict[str, Any]:
        code, body = await self.get("/credits", user)
        assert code == 200, body
        reply: dict[str, Any] = body
        return reply

    async def spend(self, times: int, user: str = "ann", prefix: str = "use") -> None:
        for n in range(times):
            await self.service.spend(self.identity(user), f"{prefix}-{n}")

    async def settled(self) -> None:
        """Every webhook delivered so far has been answered."""
        await self.fake.webhooks.idle()
        await asyncio.sleep(0)


async def start_agent(
    make_client: ClientFactory, config: BillingConfig, fake: FakeStripeAPI, *, webhooks: bool = True
) -> Agent:
    client = await make_client(config)
    agent = Agent(client, TokenFactory(config), fake)
    if webhooks:
        fake.webhooks.url = agent.webhook_url()
    return agent
