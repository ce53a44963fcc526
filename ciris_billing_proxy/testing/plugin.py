"""pytest fixtures, registered through the `pytest11` entry point: installing the package gives them
to any test suite.

* `ciris_fake_backend`: a running `FakeBillingBackend`, reset to a clean state for each test. One
  server serves the whole session from its own thread, so it works with pytest-aiohttp,
  pytest-asyncio or anyio alike, and it outlives every app a test builds, whatever the order in
  which fixtures are torn down.
* `ciris_billing_config`: a `BillingConfig` for the `ciris` provider pointed at that fake backend.
* `ciris_tokens`: a `TokenFactory` for that config.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from ..config import BillingConfig, JWTConfig
from .fake_backend import FakeBillingBackend
from .tokens import TokenFactory


@pytest.fixture(scope="session")
def ciris_fake_backend_server() -> Iterator[FakeBillingBackend]:
    with FakeBillingBackend().run_in_thread() as fake:
        yield fake


@pytest.fixture
def ciris_fake_backend(ciris_fake_backend_server: FakeBillingBackend) -> FakeBillingBackend:
    ciris_fake_backend_server.reset()
    return ciris_fake_backend_server


@pytest.fixture
def ciris_billing_config(ciris_fake_backend: FakeBillingBackend, tmp_path: Path) -> BillingConfig:
    return BillingConfig(
        jwt=JWTConfig(secret=SecretStr(secrets.token_urlsafe(48))),
        provider="ciris",
        data_dir=tmp_path,
        agent_id="test-agent",
        # Tests make the backend fail on purpose: retry give-backs quickly once it is back.
        give_back_retry_max_seconds=0.2,
        provider_options={
            "api_url": ciris_fake_backend.url,
            "api_key": ciris_fake_backend.api_key,
            "timeout_seconds": 5.0,
            "backoff_seconds": 0.01,
            "reconcile_window_seconds": 1.0,
        },
    )


@pytest.fixture
def ciris_tokens(ciris_billing_config: BillingConfig) -> TokenFactory:
    return TokenFactory(ciris_billing_config)
