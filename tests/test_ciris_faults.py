"""Backend faults through the proxy: each is a 503 (or the right 4xx) within the time budget, reads
are retried and fail over, purchases are never retried blindly, and nothing secret leaks."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import INTERACT, agent_routes, paid_user, until, who, with_options
from .conftest import ClientFactory
from .default_paths import CREDITS, INITIATE, STATUS

UNAVAILABLE = {"detail": "Billing service unavailable"}
BUDGET = 0.4


@pytest.fixture
async def tight_ciris_client(ciris_billing_config: BillingConfig, make_client: ClientFactory) -> Any:
    # The fake backend (behind the config) is set up first, so it is torn down after the app.
    # A tight budget: a fault that were not cut off by it would outlast the test client's timeout.
    config = with_options(
        ciris_billing_config,
        timeout_seconds=BUDGET,
        purchase_timeout_seconds=2 * BUDGET,
        connect_timeout_seconds=0.2,
    )
    return await make_client(config, host=agent_routes)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("kind", "seconds"),
    [
        ("latency", 30.0),
        ("drop", 0),
        ("error_500", 0),
        ("error_502", 0),
        ("rate_limit_503", 0),
        ("rate_limit_429", 0),
        ("bad_json", 0),
        ("reject_key", 0),
    ],
)
async def test_every_fault_on_credits_is_503(
    tight_ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    kind: str,
    seconds: float,
) -> None:
    ciris_fake_backend.inject(kind, seconds=seconds)
    resp = await tight_ciris_client.get(CREDITS, headers=ciris_tokens.headers(), timeout=5)
    assert resp.status == 503
    assert await resp.json() == UNAVAILABLE


@pytest.mark.parametrize("kind", ["latency", "drop", "error_500", "rate_limit_503", "reject_key"])
async def test_every_fault_on_the_gate_is_503_credit_provider_unavailable(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory, kind: str
) -> None:
    ciris_fake_backend.inject(kind, seconds=30.0)
    resp = await tight_ciris_client.post(INTERACT, json={}, headers=ciris_tokens.headers(), timeout=5)
    assert resp.status == 503
    assert await resp.json() == {"detail": "Credit provider unavailable"}


@pytest.mark.parametrize("kind", ["latency", "drop", "error_500", "rate_limit_503", "bad_json", "not_found"])
async def test_faults_on_purchase_status_are_503(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory, kind: str
) -> None:
    auth = ciris_tokens.headers("u", email="u@example.com")
    purchase = await (await tight_ciris_client.post(INITIATE, json={}, headers=auth)).json()
    ciris_fake_backend.inject(kind, endpoint="purchase_status", seconds=30.0)
    resp = await tight_ciris_client.get(STATUS + purchase["payment_id"], headers=auth, timeout=5)
    assert resp.status == 503
    assert await resp.json() == UNAVAILABLE


async def test_backend_400_on_purchase_is_400_invalid_purchase_request(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    ciris_fake_backend.inject("bad_request", endpoint="purchases")
    resp = await tight_ciris_client.post(
        INITIATE, json={}, headers=ciris_tokens.headers("u", email="u@example.com")
    )
    assert resp.status == 400
    assert await resp.json() == {"detail": "Invalid purchase request"}


async def test_payment_provider_not_configured_is_503(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    ciris_fake_backend.pricing.stripe_configured = False
    resp = await tight_ciris_client.post(
        INITIATE, json={}, headers=ciris_tokens.headers("u", email="u@example.com")
    )
    assert resp.status == 503


async def test_purchases_are_never_retried_blindly(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    ciris_fake_backend.inject("error_500", endpoint="purchases", times=1)
    resp = await tight_ciris_client.post(
        INITIATE, json={}, headers=ciris_tokens.headers("u", email="u@example.com")
    )
    assert resp.status == 503
    assert ciris_fake_backend.calls["purchases"] == 1
    ciris_fake_backend.inject("drop", endpoint="purchases", times=1)
    resp = await tight_ciris_client.post(
        INITIATE, json={}, headers=ciris_tokens.headers("v", email="v@example.com")
    )
    assert resp.status == 503
    assert ciris_fake_backend.calls["purchases"] == 2


async def test_reads_are_retried_after_a_transient_fault(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    ciris_fake_backend.inject("error_500", endpoint="credits/check", times=2)
    resp = await tight_ciris_client.get(CREDITS, headers=ciris_tokens.headers())
    assert resp.status == 200
    assert ciris_fake_backend.calls["credits/check"] == 3


async def test_charges_are_retried_with_the_same_idempotency_key(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("w")
    await tight_ciris_client.get(CREDITS, headers=auth)
    ciris_fake_backend.inject("rate_limit_503", endpoint="charges", times=1)
    assert (await tight_ciris_client.post(INTERACT, json={}, headers=auth)).status == 200
    keys = [b["idempotency_key"] for e, b, _ in ciris_fake_backend.received if e == "charges"]
    assert len(keys) == 2
    assert keys[0] == keys[1]


async def test_fail_over_to_the_next_base_url(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    config = with_options(ciris_billing_config, api_url=dead, fallback_urls=[ciris_fake_backend.url])
    client = await make_client(config)
    auth = ciris_tokens.headers("x", email="x@example.com")
    assert (await client.get(CREDITS, headers=auth)).status == 200
    # A connection that could not be made proves the purchase never left: it may move on too.
    assert (await client.post(INITIATE, json={}, headers=auth)).status == 200


async def test_refused_connection_is_503(
    make_client: ClientFactory, ciris_billing_config: BillingConfig, ciris_tokens: TokenFactory
) -> None:
    config = with_options(ciris_billing_config, api_url=f"http://127.0.0.1:{closed_port()}")
    client = await make_client(config)
    resp = await client.get(CREDITS, headers=ciris_tokens.headers())
    assert (resp.status, await resp.json()) == (503, UNAVAILABLE)


async def test_rejected_key_logs_one_error_without_the_key(
    tight_ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ciris_fake_backend.revoke_api_key(ciris_fake_backend.api_key)
    with caplog.at_level(logging.DEBUG):
        resp = await tight_ciris_client.get(CREDITS, headers=ciris_tokens.headers())
    assert resp.status == 503
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "rejected the API key" in errors[0].getMessage()
    assert ciris_fake_backend.api_key not in caplog.text


async def test_nothing_secret_in_replies_or_debug_logs(
    tight_ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    ciris_billing_config: BillingConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = ciris_tokens.token("zed", email="zed@example.com")
    auth = {"Authorization": f"Bearer {token}"}
    replies = []
    with caplog.at_level(logging.DEBUG):
        replies.append(await (await tight_ciris_client.get(CREDITS, headers=auth)).text())
        purchase = await (await tight_ciris_client.post(INITIATE, json={}, headers=auth)).json()
        replies.append(
            await (await tight_ciris_client.get(STATUS + purchase["payment_id"], headers=auth)).text()
        )
        for kind in ("error_500", "drop", "bad_json", "latency", "reject_key"):
            ciris_fake_backend.inject(kind, seconds=30.0)
            replies.append(await (await tight_ciris_client.get(CREDITS, headers=auth)).text())
            replies.append(await (await tight_ciris_client.post(INTERACT, json={}, headers=auth)).text())
            replies.append(
                await (
                    await tight_ciris_client.post(
                        INITIATE, json={}, headers=ciris_tokens.headers("y", email="y@x.org")
                    )
                ).text()
            )
            ciris_fake_backend.clear_faults()
    host_port = ciris_fake_backend.url.removeprefix("http://")
    secrets = [
        ciris_fake_backend.api_key,
        host_port,
        token,
        purchase["client_secret"],
        ciris_billing_config.jwt.secret.get_secret_value(),
    ]  # type: ignore[union-attr]
    logged = caplog.text + " ".join(str(r.args) for r in caplog.records)
    for secret in secrets:
        assert secret not in logged
        assert all(secret not in reply for reply in replies)
    assert "Traceback" not in "".join(replies)


async def test_a_charge_that_committed_then_timed_out_is_refunded(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = await paid_user(tight_ciris_client, ciris_fake_backend, ciris_tokens, "late", 3)
    ciris_fake_backend.inject("latency_after", endpoint="charges", seconds=30.0, times=1)
    resp = await tight_ciris_client.post(INTERACT, json={}, headers=auth, timeout=5)
    assert resp.status == 503
    await until(lambda: ciris_fake_backend.calls["credits"] > 0)
    assert ciris_fake_backend.account(*who("late"))["credits_remaining"] == 3
    refunds = [b for e, b, _ in ciris_fake_backend.received if e == "credits"]
    assert [r["transaction_type"] for r in refunds] == ["refund"]


async def test_a_charge_that_lands_after_its_timeout_is_found_and_refunded(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    """The backend finishes a request whose client left: the charge lands after the proxy gave up."""
    config = with_options(
        ciris_billing_config,
        timeout_seconds=0.3,
        connect_timeout_seconds=0.2,
        max_retries=0,
        reconcile_window_seconds=2.0,
    )
    client = await make_client(config, host=agent_routes)
    auth = await paid_user(client, ciris_fake_backend, ciris_tokens, "slow", 3)
    ciris_fake_backend.inject("latency", endpoint="charges", seconds=0.6, times=1)
    assert (await client.post(INTERACT, json={}, headers=auth, timeout=5)).status == 503
    await until(lambda: ciris_fake_backend.calls["credits"] > 0, seconds=5)
    assert ciris_fake_backend.account(*who("slow"))["credits_remaining"] == 3


async def test_a_charge_that_never_happened_is_not_refunded(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = await paid_user(tight_ciris_client, ciris_fake_backend, ciris_tokens, "never", 3)
    ciris_fake_backend.inject("drop", endpoint="charges")  # the connection dies before any work
    assert (await tight_ciris_client.post(INTERACT, json={}, headers=auth, timeout=5)).status == 503
    await until(lambda: ciris_fake_backend.calls["transactions"] >= 3)  # looked three times
    await asyncio.sleep(0.1)
    assert ciris_fake_backend.calls["credits"] == 0  # found no charge, minted nothing
    assert ciris_fake_backend.account(*who("never"))["credits_remaining"] == 3


async def test_a_rejected_key_logs_one_error_even_through_the_gate(
    tight_ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = ciris_tokens.headers("keyless")
    await tight_ciris_client.get(CREDITS, headers=auth)
    ciris_fake_backend.inject("reject_key", endpoint="charges")
    with caplog.at_level(logging.DEBUG):
        assert (await tight_ciris_client.post(INTERACT, json={}, headers=auth)).status == 503
        await asyncio.sleep(0.3)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert ciris_fake_backend.calls["transactions"] == 0  # a refused charge needs no reconciling


@pytest.mark.parametrize("kind", ["stripe_unavailable", "cloudflare_403", "error_500"])
async def test_purchase_faults_are_503(
    tight_ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory, kind: str
) -> None:
    ciris_fake_backend.inject(kind, endpoint="purchases")
    resp = await tight_ciris_client.post(
        INITIATE, json={}, headers=ciris_tokens.headers("p", email="p@example.com")
    )
    assert (resp.status, await resp.json()) == (503, UNAVAILABLE)


async def test_one_budget_per_operation(
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    """The check and the purchase of one initiate share one budget: two 0.3 s calls cannot both fit
    in 0.45 s, though each alone would."""
    config = with_options(
        ciris_billing_config, purchase_timeout_seconds=0.45, timeout_seconds=0.45, connect_timeout_seconds=0.2
    )
    client = await make_client(config)
    ciris_fake_backend.inject("latency", endpoint="credits/check", seconds=0.3)
    ciris_fake_backend.inject("latency", endpoint="purchases", seconds=0.3)
    resp = await client.post(
        INITIATE, json={}, headers=ciris_tokens.headers("b", email="b@example.com"), timeout=5
    )
    assert resp.status == 503
