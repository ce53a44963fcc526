"""The Python client against the demo app over real HTTP, in both modes, with every error type."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.client import (
    AuthenticationError,
    BillingAPIError,
    BillingClient,
    BillingConnectionError,
    BillingNotEnabled,
    InsufficientCreditError,
    InvalidReplyError,
    InvalidRequestError,
    NotFoundError,
    PurchaseFailed,
    PurchaseTimeout,
    ServiceUnavailableError,
)
from ciris_billing_proxy.testing import FakeBillingBackend
from ciris_billing_proxy.tools.demo import create_demo_app
from ciris_billing_proxy.tools.users import UserStore

from .conftest import make_config
from .default_paths import BILLING, CREDITS, STATUS


def users() -> UserStore:
    store = UserStore()
    store.add("ann", "pw-ann", email="ann@example.com")
    store.add("bob", "pw-bob", email="bob@example.com")
    return store


async def serve(app: web.Application) -> AsyncIterator[str]:
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def simple_url(tmp_path: Path) -> AsyncIterator[str]:
    config = make_config(tmp_path, provider_options={"database": ":memory:", "free_uses": 3})
    async for url in serve(create_demo_app(config, users(), environ={})):
        yield url


@pytest.fixture
async def ciris_url(ciris_billing_config: BillingConfig) -> AsyncIterator[str]:
    async for url in serve(create_demo_app(ciris_billing_config, users(), environ={})):
        yield url


async def test_simple_mode(simple_url: str) -> None:
    async with BillingClient(simple_url) as client:
        login = await client.login("ann", "pw-ann")
        assert (login.user_id, login.role, login.token_type) == ("ann", "OBSERVER", "Bearer")
        credits = await client.get_credits()
        assert (credits.has_credit, credits.free_uses_remaining) == (True, 3)
        for _ in range(3):
            await client.request("POST", "/v1/agent/interact", json_body={"message": "hi"})
        with pytest.raises(InsufficientCreditError) as no_credit:
            await client.request("POST", "/v1/agent/interact", json_body={"message": "hi"})
        assert no_credit.value.status == 402
        assert no_credit.value.detail["error"] == "insufficient_credit"
        with pytest.raises(BillingNotEnabled) as disabled:
            await client.initiate_purchase()
        assert (disabled.value.status, disabled.value.detail) == (403, "Billing not enabled for this agent")
        page = await client.get_transactions(limit=2)
        assert (page.total_count, page.has_more, len(page.transactions)) == (3, True, 2)
        with pytest.raises(InvalidRequestError) as bad:
            await client.get_transactions(limit=500)
        assert bad.value.status == 422


async def test_ciris_mode_whole_purchase_flow(ciris_url: str, ciris_fake_backend: FakeBillingBackend) -> None:
    async with BillingClient(ciris_url) as client:
        await client.login("ann", "pw-ann")
        purchase = await client.initiate_purchase(return_url="https://ui.example/done")
        assert (purchase.amount_minor, purchase.uses_purchased) == (500, 20)

        async def pay_later() -> None:
            await asyncio.sleep(0.1)
            ciris_fake_backend.confirm_payment(purchase.payment_id, webhook_delay=0.2)

        polls: list[str] = []
        confirm = asyncio.ensure_future(pay_later())
        done = await client.wait_for_purchase(
            purchase.payment_id, interval=0.05, max_attempts=100, on_poll=lambda n, s: polls.append(s.status)
        )
        await confirm
        assert (done.status, done.credits_added, done.balance_after) == ("succeeded", 20, 20)
        assert polls[0] == "requires_payment_method"
        assert "processing" in polls
        assert (await client.get_credits()).credits_remaining == 20

        async with BillingClient(ciris_url) as bob:
            await bob.login("bob", "pw-bob")
            with pytest.raises(NotFoundError) as other:
                await bob.get_purchase_status(purchase.payment_id)
            assert other.value.detail == "Payment not found"


@pytest.mark.parametrize("ending", ["canceled", "failed"])
async def test_wait_for_purchase_raises_on_failure(
    ciris_url: str, ciris_fake_backend: FakeBillingBackend, ending: str
) -> None:
    async with BillingClient(ciris_url) as client:
        await client.login("ann", "pw-ann")
        purchase = await client.initiate_purchase()
        ciris_fake_backend.fail_payment(purchase.payment_id, ending)
        with pytest.raises(PurchaseFailed) as failed:
            await client.wait_for_purchase(purchase.payment_id, interval=0, max_attempts=3)
        assert failed.value.purchase.status == ending


async def test_wait_for_purchase_times_out(ciris_url: str) -> None:
    async with BillingClient(ciris_url) as client:
        await client.login("ann", "pw-ann")
        purchase = await client.initiate_purchase()
        with pytest.raises(PurchaseTimeout) as slow:
            await client.wait_for_purchase(purchase.payment_id, interval=0, max_attempts=2)
        assert slow.value.last.status == "requires_payment_method"


async def test_unavailable_backend(ciris_url: str, ciris_fake_backend: FakeBillingBackend) -> None:
    async with BillingClient(ciris_url) as client:
        await client.login("ann", "pw-ann")
        ciris_fake_backend.inject("error_500")
        with pytest.raises(ServiceUnavailableError) as down:
            await client.get_credits()
        assert (down.value.status, down.value.detail) == (503, "Billing service unavailable")


async def test_authentication_errors_and_relogin(simple_url: str) -> None:
    async with BillingClient(simple_url) as client:
        with pytest.raises(AuthenticationError) as bad_login:
            await client.login("ann", "nope")
        assert bad_login.value.detail == "Invalid credentials"
        with pytest.raises(AuthenticationError):
            await client.get_credits()  # no token at all

    relogins = 0

    async def relogin(c: BillingClient) -> None:
        nonlocal relogins
        relogins += 1
        await c.login("ann", "pw-ann")

    async with BillingClient(simple_url, token="expired.or.revoked", on_unauthorized=relogin) as client:
        assert (await client.get_credits()).has_credit is True
        assert relogins == 1


async def test_unreachable_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with BillingClient(f"http://127.0.0.1:{port}", timeout=2) as client:
        with pytest.raises(BillingConnectionError):
            await client.login("a", "b")


async def test_a_reply_that_breaks_the_contract(aiohttp_server: Any) -> None:
    async def credits(request: web.Request) -> web.Response:
        return web.json_response({"has_credit": True, "credits_remaining": None})

    app = web.Application()
    app.router.add_get(CREDITS, credits)
    server = await aiohttp_server(app)
    async with BillingClient(str(server.make_url("")), token="t") as client:
        with pytest.raises(InvalidReplyError, match="credits_remaining"):
            await client.get_credits()


def odd_agent(routes: dict[str, tuple[int, Any]]) -> web.Application:
    """A server answering fixed bodies per path: CIRIS agents' own shapes, or broken ones."""

    async def handler(request: web.Request) -> web.Response:
        status, body = routes[request.path]
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, content_type="text/html")
        return web.json_response(body, status=status)

    app = web.Application()
    for path in routes:
        app.router.add_route("*", path, handler)
    return app


async def test_replies_of_real_ciris_agents_are_accepted(aiohttp_server: Any) -> None:
    """docs/compatibility.md lets agents send a null balance_after and options without a purchase."""
    server = await aiohttp_server(
        odd_agent(
            {
                CREDITS: (
                    200,
                    {
                        "has_credit": False,
                        "credits_remaining": 0,
                        "free_uses_remaining": 0,
                        "total_uses": 5,
                        "plan_name": "free",
                        "purchase_required": False,
                        "purchase_options": {"price_minor": 0, "uses": 0, "currency": "USD"},
                        "extra": 1,
                    },
                ),
                f"{STATUS}pi_1": (
                    200,
                    {"status": "pending", "credits_added": 0, "balance_after": None},
                ),
                f"{BILLING}/data": (200, {"data": {"status": "succeeded"}}),
            }
        )
    )
    async with BillingClient(str(server.make_url("")), token="t") as client:
        credits = await client.get_credits()
        assert (credits.purchase_required, credits.purchase_options is not None) == (False, True)
        status = await client.get_purchase_status("pi_1")
        assert (status.status, status.balance_after) == ("pending", None)
        assert await client.request("GET", f"{BILLING}/data") == {"status": "succeeded"}  # SDK unwrap
        assert await client.request("GET", f"{BILLING}/data", unwrap=False) == {
            "data": {"status": "succeeded"}
        }


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (403, "ForbiddenError"),
        (405, "BillingAPIError"),
        (409, "AlreadyProcessedError"),
        (429, "RateLimitedError"),
        (413, "InvalidRequestError"),
        (502, "ServiceUnavailableError"),
    ],
)
async def test_error_classes(aiohttp_server: Any, status: int, error: str) -> None:
    server = await aiohttp_server(odd_agent({CREDITS: (status, {"detail": "nope"})}))
    async with BillingClient(str(server.make_url("")), token="t") as client:
        with pytest.raises(BillingAPIError) as raised:
            await client.get_credits()
    assert type(raised.value).__name__ == error
    assert (raised.value.status, raised.value.detail) == (status, "nope")


async def test_wait_for_purchase_polls_through_passing_faults(
    ciris_url: str, ciris_fake_backend: FakeBillingBackend
) -> None:
    async with BillingClient(ciris_url) as client:
        await client.login("ann", "pw-ann")
        purchase = await client.initiate_purchase()
        ciris_fake_backend.inject("error_500", endpoint="purchase_status", times=3)  # one poll's retries
        ciris_fake_backend.confirm_payment(purchase.payment_id)
        seen: list[str | None] = []
        done = await client.wait_for_purchase(
            purchase.payment_id,
            interval=0,
            max_attempts=5,
            on_poll=lambda n, s: seen.append(None if s is None else s.status),
        )
        assert done.status == "succeeded"
        assert seen == [None, "succeeded"]


async def test_html_error_pages_and_huge_replies(aiohttp_server: Any) -> None:
    page = b"<html>\n<body>\n<h1>502 Bad Gateway</h1>\n</body>\n</html>"
    huge = {"has_credit": True, "pad": "x" * (2 * 1024 * 1024)}
    server = await aiohttp_server(odd_agent({CREDITS: (502, page), "/big": (200, huge)}))
    async with BillingClient(str(server.make_url("")), token="t") as client:
        with pytest.raises(ServiceUnavailableError) as down:
            await client.get_credits()
        assert down.value.detail == f"text/html reply of {len(page)} bytes"
        with pytest.raises(InvalidReplyError, match="more than"):
            await client.request("GET", "/big")


def test_bad_base_urls() -> None:
    for url in ("127.0.0.1:8000", "ftp://h", "http://h:1/?x=1", "http://h#f"):
        with pytest.raises(ValueError, match="base_url"):
            BillingClient(url)


async def test_connection_errors_do_not_show_url_passwords() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with BillingClient(f"http://user:s3cret@127.0.0.1:{port}", timeout=2) as client:
        with pytest.raises(BillingConnectionError) as down:
            await client.login("a", "b")
    assert "s3cret" not in str(down.value)
