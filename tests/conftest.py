"""Shared fixtures: a config with a known secret, a token factory, and apps served over real HTTP."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciris_billing_proxy import AuthenticatedUser, BillingConfig, JWTConfig, setup_billing
from ciris_billing_proxy.ops.logs import FaultLog
from ciris_billing_proxy.providers.base import CreditProvider
from ciris_billing_proxy.testing import TokenFactory

from .postgres import fresh_database

# pytester runs the conformance kit against broken providers (tests/test_conformance.py).
pytest_plugins = ["pytester"]

SECRET = "unit-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz-0123456789-ABCDEF"

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def make_config(tmp_path: Path, **overrides: Any) -> BillingConfig:
    jwt = overrides.pop("jwt", {"secret": SECRET})
    options = overrides.pop("provider_options", {"database": ":memory:"})
    return BillingConfig(jwt=JWTConfig(**jwt), data_dir=tmp_path, provider_options=options, **overrides)


@pytest.fixture(autouse=True)
def fresh_fault_logs() -> None:
    """Each test sees every fault line's first occurrence (`ops.logs.FaultLog`)."""
    FaultLog.forget_all()


@pytest.fixture
def config(tmp_path: Path) -> BillingConfig:
    return make_config(tmp_path)


@pytest.fixture
def tokens(config: BillingConfig) -> TokenFactory:
    return TokenFactory(config)


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    """Build an app with billing set up (`setup_billing` kwargs pass through) and serve it."""

    async def factory(
        config: BillingConfig,
        *,
        provider: CreditProvider | None = None,
        host: Callable[[web.Application], None] | None = None,
        **kwargs: Any,
    ) -> TestClient[web.Request, web.Application]:
        app = web.Application()
        if host is not None:
            host(app)
        setup_billing(app, config, provider=provider, environ={}, **kwargs)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        return client

    return factory


@pytest.fixture
async def billing_client(
    make_client: ClientFactory, config: BillingConfig
) -> TestClient[web.Request, web.Application]:
    return await make_client(config)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A new database on the test PostgreSQL server (see tests/postgres.py), dropped afterwards."""
    async with fresh_database() as url:
        yield url


class CountingAuthenticator:
    """Two users, and a count of how often a password is checked at all. (No scrypt: the throttle
    sits in front of whatever the host checks passwords with.)"""

    def __init__(self) -> None:
        self.passwords = {"ann": "correct horse", "bob": "battery staple"}
        self.calls = 0

    async def __call__(self, username: str, password: str) -> AuthenticatedUser | None:
        self.calls += 1
        expected = self.passwords.get(username)
        if expected is None or not hmac.compare_digest(expected, password):
            return None
        return AuthenticatedUser(user_id=username)
