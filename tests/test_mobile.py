"""App store purchases through the agent (`google-play/verify`, `apple-storekit/verify`), with the
`ciris` provider against the fake backend over real HTTP, and the native apps' ID-token mode."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.client import BillingClient
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory
from ciris_billing_proxy.testing.fake_backend import fake_id_token

from .ciris_helpers import INTERACT, agent_routes, who, with_options
from .conftest import ClientFactory
from .default_paths import APP_STORE, CAPABILITIES, CREDITS, GOOGLE_PLAY, TRANSACTIONS
from .providers import MobileShopProvider, ShopProvider
from .serving import clean_env, login, serve

PACKAGE = "ai.ciris.mobile"
NOT_ENABLED_REPLY = {
    "success": False,
    "credits_added": 0,
    "new_balance": 0,
    "already_processed": False,
    "error": "Billing not enabled for this agent",
}
MISSING = {"detail": "Missing X-Google-ID-Token or X-Apple-ID-Token header"}


def play(token: str, product: str = "credits_100") -> dict[str, str]:
    return {"purchase_token": token, "product_id": product, "package_name": PACKAGE}


def new_token() -> str:
    return f"gp-{secrets.token_hex(16)}"


@pytest.fixture
async def ciris_client(ciris_billing_config: BillingConfig, make_client: ClientFactory) -> Any:
    return await make_client(ciris_billing_config, host=agent_routes)


async def paid(client: Any, auth: dict[str, str]) -> int:
    body = await (await client.get(CREDITS, headers=auth)).json()
    return int(body["credits_remaining"])


async def test_a_google_play_purchase_adds_its_credits_once(
    ciris_client: Any,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = ciris_tokens.headers("ann")
    assert await paid(ciris_client, auth) == 0  # now cached: the verification must drop it
    token = new_token()
    with caplog.at_level(logging.DEBUG):
        first = await ciris_client.post(GOOGLE_PLAY, json=play(token), headers=auth)
        again = await ciris_client.post(GOOGLE_PLAY, json=play(token), headers=auth)
    assert first.status == again.status == 200
    assert await first.json() == {
        "success": True,
        "credits_added": 99,
        "new_balance": 99,
        "already_processed": False,
        "error": None,
    }
    assert await again.json() == {
        "success": True,
        "credits_added": 0,
        "new_balance": 99,
        "already_processed": True,
        "error": None,
    }
    assert await paid(ciris_client, auth) == 99
    assert ciris_fake_backend.account(*who("ann"))["credits_remaining"] == 99
    assert token not in caplog.text


async def test_an_app_store_purchase_adds_its_credits_once(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("bea")
    body = {"transaction_id": "2000000000000001", "product_id": "ai.ciris.mobile.credits_250_v1"}
    replies = [await (await ciris_client.post(APP_STORE, json=body, headers=auth)).json() for _ in range(2)]
    assert [(r["success"], r["credits_added"], r["already_processed"]) for r in replies] == [
        (True, 249, False),
        (True, 0, True),
    ]
    assert await paid(ciris_client, auth) == 249
    # The backend got the user's identity with the transaction.
    sent = [body for endpoint, body, _ in ciris_fake_backend.received if endpoint == "apple-storekit/verify"]
    assert len(sent) == 2
    assert all((b["oauth_provider"], b["external_id"]) == who("bea") for b in sent if b)


async def test_concurrent_identical_verifications_add_the_credits_exactly_once(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    auth = ciris_tokens.headers("cas")
    token = new_token()
    replies = await asyncio.gather(
        *(ciris_client.post(GOOGLE_PLAY, json=play(token, "credits_600"), headers=auth) for _ in range(12))
    )
    bodies = [await r.json() for r in replies]
    assert all(r.status == 200 for r in replies)
    assert sorted(b["credits_added"] for b in bodies) == [0] * 11 + [599]
    assert sum(not b["already_processed"] for b in bodies) == 1
    assert await paid(ciris_client, auth) == 599
    listing = await (await ciris_client.get(TRANSACTIONS, headers=auth)).json()
    assert [t["amount_minor"] for t in listing["transactions"] if t["type"] == "credit"] == [599]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (play("invalid-refunded-purchase"), "Purchase not valid: state=1"),
        (play(new_token(), "credits_9000"), "Unknown product ID: credits_9000"),
        (play("short"), "The purchase could not be verified"),  # the backend's 422 on its length
    ],
)
async def test_a_refused_purchase_is_a_200_with_success_false_and_adds_nothing(
    ciris_client: Any, ciris_tokens: TokenFactory, body: dict[str, str], error: str
) -> None:
    auth = ciris_tokens.headers("dan")
    resp = await ciris_client.post(GOOGLE_PLAY, json=body, headers=auth)
    assert resp.status == 200
    assert await resp.json() == {
        "success": False,
        "credits_added": 0,
        "new_balance": 0,
        "already_processed": False,
        "error": error,
    }
    assert await paid(ciris_client, auth) == 0


@pytest.mark.parametrize(("kind", "seconds"), [("error_500", 0), ("rate_limit_503", 0), ("latency", 30.0)])
async def test_backend_failures_and_timeouts_are_a_json_503(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    seconds: float,
) -> None:
    config = with_options(ciris_billing_config, purchase_timeout_seconds=0.5, connect_timeout_seconds=0.2)
    client = await make_client(config)
    ciris_fake_backend.inject(kind, endpoint="google-play/verify", seconds=seconds)
    token = new_token()
    with caplog.at_level(logging.DEBUG):
        resp = await client.post(GOOGLE_PLAY, json=play(token), headers=ciris_tokens.headers(), timeout=5)
    assert resp.status == 503
    assert await resp.json() == {"detail": "Billing service unavailable"}
    assert "google-play/verify" in caplog.text
    assert token not in caplog.text


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        (GOOGLE_PLAY, {"purchase_token": "x" * 20, "product_id": "credits_100"}, 422, "package_name"),
        (GOOGLE_PLAY, {**play("tok-123456789"), "purchase_token": 5}, 422, "purchase_token"),
        (APP_STORE, {"transaction_id": "", "product_id": "p"}, 422, "transaction_id"),
        (APP_STORE, None, 400, "Request body is empty"),
    ],
)
async def test_bad_bodies_are_json_errors_naming_the_field(
    ciris_client: Any, ciris_tokens: TokenFactory, path: str, body: Any, status: int, detail: str
) -> None:
    resp = await ciris_client.post(path, json=body, headers=ciris_tokens.headers())
    assert resp.status == status
    assert detail in (await resp.json())["detail"]


async def test_verification_needs_the_agents_token(ciris_client: Any) -> None:
    resp = await ciris_client.post(GOOGLE_PLAY, json=play(new_token()))
    assert resp.status == 401
    assert "detail" in await resp.json()


@pytest.mark.parametrize("path", [GOOGLE_PLAY, APP_STORE])
async def test_simple_and_a_provider_without_the_capability_answer_200_success_false(
    billing_client: Any, make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory, path: str
) -> None:
    """As CIRIS answers: the apps show any non-2xx as a raw "API error: HTTP n"."""
    shop = ShopProvider()
    body = play(new_token()) | {"transaction_id": "2000000000000002"}
    for client in (billing_client, await make_client(config, provider=shop)):
        resp = await client.post(path, json=body, headers=tokens.headers())
        assert resp.status == 200
        assert await resp.json() == NOT_ENABLED_REPLY
        assert (await client.post(path, json={}, headers=tokens.headers())).status == 422  # still checked
        capabilities = await (await client.get(CAPABILITIES, headers=tokens.headers())).json()
        assert (capabilities["google_play"], capabilities["apple_storekit"]) == (False, False)
    assert not shop.calls  # refused before the provider is asked


async def test_an_app_store_purchase_without_a_product_id_is_redeemed(
    ciris_client: Any, ciris_fake_backend: FakeBillingBackend, ciris_tokens: TokenFactory
) -> None:
    """The iOS app sends only `transaction_id`; the store's record names the product."""
    auth = ciris_tokens.headers("ivy")
    resp = await ciris_client.post(APP_STORE, json={"transaction_id": "2000000000000077"}, headers=auth)
    assert resp.status == 200
    assert (await resp.json())["credits_added"] == 99
    sent = [b for e, b, _ in ciris_fake_backend.received if e == "apple-storekit/verify"]
    assert sent
    assert "product_id" not in sent[-1]


async def test_a_third_party_provider_that_declares_the_stores_serves_them(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, provider=MobileShopProvider())
    auth = tokens.headers("eve")
    capabilities = await (await client.get(CAPABILITIES, headers=auth)).json()
    assert (capabilities["google_play"], capabilities["apple_storekit"]) == (True, True)
    body = {"transaction_id": "2000000000000003", "product_id": "anything"}
    first = await (await client.post(APP_STORE, json=body, headers=auth)).json()
    assert (first["credits_added"], first["new_balance"]) == (100, 100)
    assert (await (await client.get(CREDITS, headers=auth)).json())["credits_remaining"] == 100


# --- id_token mode ------------------------------------------------------------------------------


@pytest.fixture
def id_token_config(ciris_billing_config: BillingConfig) -> BillingConfig:
    options = {k: v for k, v in ciris_billing_config.provider_options.items() if k != "api_key"}
    return ciris_billing_config.model_copy(update={"provider_options": {**options, "auth_mode": "id_token"}})


@pytest.fixture
async def native_client(id_token_config: BillingConfig, make_client: ClientFactory) -> Any:
    return await make_client(id_token_config, host=agent_routes)


async def test_id_token_mode_end_to_end(
    native_client: Any,
    id_token_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = ciris_fake_backend
    subject = secrets.token_hex(8)
    id_token = fake_id_token("google", subject)
    agent_auth = TokenFactory(id_token_config).headers("frank")
    auth = {**agent_auth, "X-Google-ID-Token": id_token}
    with caplog.at_level(logging.DEBUG):
        capabilities = await (await native_client.get(CAPABILITIES, headers=agent_auth)).json()
        assert capabilities == {
            "provider": "ciris",
            "purchases": False,
            "transactions": False,
            "google_play": True,
            "apple_storekit": True,
            "charges": False,
            "products": ["web_search"],
        }
        for path in (CREDITS, INTERACT):
            missing = await native_client.request(
                "GET" if path == CREDITS else "POST", path, headers=agent_auth, json={}
            )
            assert missing.status == 401
            assert await missing.json() == MISSING

        credit = await (await native_client.get(CREDITS, headers=auth)).json()
        assert credit["has_credit"] is True
        # The backend derived the identity from the token, not from the body.
        before = fake.account("oauth:google", subject)
        assert (await native_client.post(INTERACT, json={}, headers=auth)).status == 200
        assert fake.account("oauth:google", subject)["total_uses"] == before["total_uses"]  # informational
        assert fake.calls["charges"] == 0

        verified = await native_client.post(GOOGLE_PLAY, json=play(new_token()), headers=auth)
        assert (await verified.json())["credits_added"] == 99
        assert fake.account("oauth:google", subject)["credits_remaining"] == 99
        assert (await (await native_client.get(CREDITS, headers=auth)).json())["credits_remaining"] == 99

        apple = {**agent_auth, "X-Apple-ID-Token": fake_id_token("apple", subject)}
        body = {"transaction_id": "2000000000000004", "product_id": "ai.ciris.mobile.credits_100_v1"}
        assert (await (await native_client.post(APP_STORE, json=body, headers=apple)).json())["success"]
        assert fake.account("oauth:apple", subject)["credits_remaining"] == 99

    assert id_token not in caplog.text
    assert id_token not in repr(list(fake.received))


async def test_id_token_mode_gate_refuses_without_credit(
    native_client: Any, id_token_config: BillingConfig, ciris_fake_backend: FakeBillingBackend
) -> None:
    subject = secrets.token_hex(8)
    auth = {
        **TokenFactory(id_token_config).headers("gus"),
        "X-Google-ID-Token": fake_id_token("google", subject),
    }
    # The account exists with no uses left before the agent first asks about it.
    ciris_fake_backend.ledger.check({"oauth_provider": "oauth:google", "external_id": subject})
    ciris_fake_backend.use_up_free_uses("oauth:google", subject)
    resp = await native_client.post(INTERACT, json={}, headers=auth)
    assert resp.status == 402
    assert (await resp.json())["detail"]["error"] == "insufficient_credit"


async def test_a_refused_id_token_is_a_401(
    native_client: Any, id_token_config: BillingConfig, caplog: pytest.LogCaptureFixture
) -> None:
    agent_auth = TokenFactory(id_token_config).headers("hal")
    for token in (fake_id_token("google", "expired"), "not-a-token"):
        with caplog.at_level(logging.DEBUG):
            resp = await native_client.get(CREDITS, headers={**agent_auth, "X-Google-ID-Token": token})
        assert resp.status == 401
        assert await resp.json() == {
            "detail": "The billing backend did not accept the ID token; sign in again"
        }
        assert token not in caplog.text


async def test_the_python_client_verifies_both_stores(ciris_client: Any, ciris_tokens: TokenFactory) -> None:
    base = str(ciris_client.make_url(""))
    async with BillingClient(base, token=ciris_tokens.token("ivy")) as billing:
        capabilities = await billing.capabilities()
        assert (capabilities.google_play, capabilities.apple_storekit, capabilities.charges) == (
            True,
            True,
            True,
        )
        play_reply = await billing.verify_google_play(new_token(), "credits_250", PACKAGE)
        store_reply = await billing.verify_app_store("2000000000000005", "ai.ciris.mobile.credits_100_v1")
        refused = await billing.verify_google_play("invalid-token-0", "credits_100", PACKAGE)
        assert (await billing.get_credits()).credits_remaining == 249 + 99
    assert (play_reply.credits_added, store_reply.credits_added) == (249, 99)
    assert (refused.success, refused.error) == (False, "Purchase not valid: state=1")


async def test_the_python_client_sends_the_id_token(
    native_client: Any, id_token_config: BillingConfig, ciris_fake_backend: FakeBillingBackend
) -> None:
    subject = secrets.token_hex(8)
    base = str(native_client.make_url(""))
    token = TokenFactory(id_token_config).token("jo")
    apple = fake_id_token("apple", subject)
    async with BillingClient(
        base, token=token, id_token=apple, id_token_header="X-Apple-ID-Token"
    ) as billing:
        reply = await billing.verify_google_play(new_token(), "credits_100", PACKAGE)
        assert (await billing.capabilities()).charges is False
    assert reply.new_balance == 99
    assert ciris_fake_backend.account("oauth:apple", subject)["credits_remaining"] == 99


def demo_password(server_output: list[str]) -> str:
    found = re.search(r"with password (\S+)\n", "".join(server_output))
    assert found, server_output
    return found.group(1)


async def test_serve_fake_backend_runs_the_mobile_flow(tmp_path: Path) -> None:
    with serve(["--fake-backend"], tmp_path) as server:
        async with aiohttp.ClientSession() as session:
            bearer = await login(session, server.url, "demo", demo_password(server.output))
            auth = {"Authorization": f"Bearer {bearer}"}
            token = new_token()
            for expected in (99, 0):
                async with session.post(server.url + GOOGLE_PLAY, json=play(token), headers=auth) as r:
                    assert (await r.json())["credits_added"] == expected
            async with session.get(server.url + CREDITS, headers=auth) as r:
                assert (await r.json())["credits_remaining"] == 99
    assert token not in "".join(server.output)


async def test_serve_fake_backend_in_id_token_mode(tmp_path: Path) -> None:
    id_token = fake_id_token("google", secrets.token_hex(8))
    with serve(["--fake-backend"], tmp_path, clean_env(CIRIS_BILLING_AUTH_MODE="id_token")) as server:
        async with aiohttp.ClientSession() as session:
            bearer = await login(session, server.url, "demo", demo_password(server.output))
            auth = {"Authorization": f"Bearer {bearer}", "X-Google-ID-Token": id_token}
            async with session.get(server.url + CAPABILITIES, headers=auth) as r:
                assert (await r.json())["charges"] is False
            async with session.post(server.url + GOOGLE_PLAY, json=play(new_token()), headers=auth) as r:
                assert (await r.json())["new_balance"] == 99
            async with session.get(server.url + CREDITS, headers=auth) as r:
                assert (await r.json())["credits_remaining"] == 99
    assert id_token not in "".join(server.output)
