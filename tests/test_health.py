"""Liveness and readiness (`ciris_billing_proxy.ops.health`): /healthz, /readyz and
`BillingService.health()`, which name what is not ready and answer 503 until it is, over real
HTTP, with a real database cut through a TCP proxy and a fake backend that rejects the API key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from ciris_billing_proxy import (
    BillingConfig,
    ConfigError,
    CreditStatus,
    Identity,
    ProviderUnavailable,
    add_health_routes,
    setup_billing,
)
from ciris_billing_proxy.ops import health
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.testing import FakeBillingBackend
from ciris_billing_proxy.tools.cli import make_runner

from .conftest import ClientFactory, make_config
from .postgres import TcpProxy

ALL_OK = {"service": "ok", "store": "ok", "change_feed": "ok", "provider": "ok"}


def host_with_health(app: web.Application) -> None:
    add_health_routes(app)


async def ready(client: Any) -> tuple[int, dict[str, Any]]:
    reply = await client.get("/readyz")
    return reply.status, await reply.json()


async def until_status(client: Any, status: int, seconds: float = 20.0) -> dict[str, Any]:
    """The readiness body once it answers `status` (the last one seen otherwise, for the assert)."""
    body: dict[str, Any] = {}
    for _ in range(int(seconds / 0.1)):
        got, body = await ready(client)
        if got == status:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"readiness never answered {status}: {body}")


async def test_alive_and_ready_answer_without_a_token(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    client = await make_client(config, host=host_with_health)
    alive = await client.get("/healthz")
    assert (alive.status, await alive.json()) == (200, {"status": "ok"})
    assert await ready(client) == (200, {"status": "ok", "checks": ALL_OK})


async def test_the_service_answers_the_same_to_a_host(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    app = web.Application()
    billing = setup_billing(app, config, environ={})
    add_health_routes(app)
    outer = web.Application()
    outer.add_subapp("/agent", app)
    runner = make_runner(outer, idle_timeout=5)
    await runner.setup()
    try:
        result = await billing.health()
        assert result.ready
        assert result.checks == ALL_OK
        assert result.detail == ""
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/agent/readyz") as r,
        ):
            assert r.status == 200
    finally:
        await runner.cleanup()
    assert billing.lifecycle == "stopping"
    stopped = await billing.health()
    assert not stopped.ready
    assert stopped.checks["service"] == "stopping"


class SickProvider(SimpleProvider):
    """A provider whose health check says what the test sets, or raises it, or hangs."""

    answer: object = None

    async def health(self) -> str | None:
        if isinstance(self.answer, BaseException):
            raise self.answer
        if self.answer == "hang":
            await asyncio.sleep(60)
        return self.answer  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("answer", "check"),
    [
        ("backend refused the API key (HTTP 401)", "backend refused the API key (HTTP 401)"),
        (ProviderUnavailable("database unavailable"), "unavailable (database unavailable)"),
        (RuntimeError("secret https://user:pw@host"), "check failed (RuntimeError)"),
        (42, "check failed (bad answer)"),
        ("hang", "no answer within 0.2 s"),
    ],
)
async def test_a_provider_that_is_not_ready_makes_readiness_503_naming_it(
    make_client: ClientFactory,
    config: BillingConfig,
    monkeypatch: pytest.MonkeyPatch,
    answer: object,
    check: str,
) -> None:
    monkeypatch.setattr(health, "CHECK_SECONDS", 0.2)
    provider = SickProvider(database=":memory:")
    client = await make_client(config, provider=provider, host=host_with_health)
    provider.answer = answer
    status, body = await ready(client)
    assert status == 503
    assert body == {
        "status": "unavailable",
        "checks": {**ALL_OK, "provider": check},
        "detail": f"not ready: provider: {check}",
    }
    assert "secret" not in str(body)
    provider.answer = None
    assert await ready(client) == (200, {"status": "ok", "checks": ALL_OK})


async def test_a_rejected_api_key_is_one_warning_at_startup_and_readiness_follows_the_key(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ciris_fake_backend.revoke_api_key(ciris_fake_backend.api_key)
    with caplog.at_level(logging.INFO, "ciris_billing_proxy"):
        client = await make_client(ciris_billing_config, host=host_with_health)
        for _ in range(100):
            if any("not ready at startup" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    lines = [r for r in caplog.records if r.name.startswith("ciris_billing_proxy")]
    assert [(r.levelname, r.getMessage()) for r in lines] == [
        (
            "WARNING",
            "Billing is not ready at startup: provider: backend refused the API key (HTTP 401)",
        )
    ]
    status, body = await ready(client)
    assert (status, body["checks"]["provider"]) == (503, "backend refused the API key (HTTP 401)")
    assert ciris_fake_backend.api_key not in str(body)
    assert ciris_fake_backend.url not in str(body)

    ciris_fake_backend.reset()  # the key is accepted again
    assert await until_status(client, 200) == {"status": "ok", "checks": ALL_OK}


async def test_a_backend_that_is_down_is_not_ready(
    make_client: ClientFactory, ciris_billing_config: BillingConfig, unused_tcp_port: int
) -> None:
    options = {**ciris_billing_config.provider_options, "api_url": f"http://127.0.0.1:{unused_tcp_port}"}
    config = ciris_billing_config.model_copy(update={"provider_options": options})
    client = await make_client(config, host=host_with_health)
    status, body = await ready(client)
    assert status == 503
    assert body["checks"]["provider"].startswith("backend unavailable: cannot connect")
    assert str(unused_tcp_port) not in str(body)


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[TcpProxy]:
    target = URL(pg_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.cut()


async def test_readiness_is_503_during_a_database_cut_and_200_again_after_it(
    pg_url: str, proxy: TcpProxy, make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(tmp_path, database_url=proxy.url_for(pg_url))
    client = await make_client(config, host=host_with_health)
    assert await ready(client) == (200, {"status": "ok", "checks": ALL_OK})

    await proxy.cut()
    body = await until_status(client, 503)
    assert body["checks"]["store"] == "unavailable (database unavailable)"
    # The feed notices within its ping interval: both are named once it has.
    body = await until_status_where(client, lambda b: b["checks"]["change_feed"] != "ok")
    assert body["checks"]["change_feed"] == "not hearing the other processes (reconnecting)"
    assert body["detail"].startswith("not ready: store: unavailable (database unavailable); change_feed: ")
    assert str(proxy.port) not in str(body)
    alive = await client.get("/healthz")
    assert alive.status == 200  # alive all along: restarting it would not bring the database back

    await proxy.restore()
    assert await until_status(client, 200) == {"status": "ok", "checks": ALL_OK}


async def until_status_where(client: Any, condition: Any, seconds: float = 20.0) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(int(seconds / 0.1)):
        _, body = await ready(client)
        if condition(body):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"readiness never got there: {body}")


class UnstartableProvider(SimpleProvider):
    failure: Exception = ProviderUnavailable("backend down")

    async def start(self) -> None:
        raise self.failure

    async def credit_status(self, identity: Identity) -> CreditStatus:
        raise AssertionError("never started")


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (
            ProviderUnavailable("backend down"),
            "credit provider 'simple' could not start: its backend or database is unavailable (backend down)",
        ),
        (
            OSError("connect to https://key@backend failed"),
            "credit provider 'simple' could not start: OSError in start()",
        ),
    ],
)
async def test_a_provider_that_cannot_start_is_one_config_error_naming_it(
    config: BillingConfig, failure: Exception, message: str
) -> None:
    provider = UnstartableProvider(database=":memory:")
    provider.failure = failure
    app = web.Application()
    setup_billing(app, config, provider=provider, environ={})
    runner = make_runner(app, idle_timeout=5)
    with pytest.raises(ConfigError) as raised:
        await runner.setup()
    await runner.cleanup()
    assert str(raised.value) == message
    assert raised.value.__cause__ is failure
