"""A broken provider is refused at setup or startup with one clear line, and a provider that
answers with the wrong type is a 503 with one ERROR line, never a 500."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import ConfigError, CreditProvider, Identity, setup_billing
from ciris_billing_proxy.testing import TokenFactory

from .conftest import ClientFactory, make_config
from .default_paths import CREDITS, INITIATE
from .providers import ShopProvider, fake_distribution
from .serving import clean_env


@pytest.mark.parametrize("provider", [ShopProvider, object(), "shop"], ids=["a class", "an object", "a name"])
def test_setup_refuses_what_is_not_a_provider_instance(tmp_path: Path, provider: Any) -> None:
    with pytest.raises(TypeError, match="takes a CreditProvider instance") as info:
        setup_billing(web.Application(), make_config(tmp_path), provider=provider, environ={})
    if provider is ShopProvider:
        assert "the class ShopProvider" in str(info.value)


def test_setup_refuses_an_instance_with_a_method_that_is_not_async(tmp_path: Path) -> None:
    class Blocking(ShopProvider):
        def spend(self, identity: Identity, idempotency_key: str) -> None:  # type: ignore[override]
            return None

    with pytest.raises(ConfigError, match=r"method spend must be a coroutine function"):
        setup_billing(web.Application(), make_config(tmp_path), provider=Blocking(), environ={})


BROKEN = {
    "abstract": (
        """
        from ciris_billing_proxy import CreditProvider

        class Provider(CreditProvider):
            async def credit_status(self, identity): ...
            async def spend(self, identity, key): ...
        """,
        "method give_back is not implemented",
    ),
    "sync": (
        """
        from ciris_billing_proxy.providers.simple import SimpleProvider

        class Provider(SimpleProvider):
            def credit_status(self, identity): ...
        """,
        "method credit_status must be a coroutine function",
    ),
    "raises": (
        """
        from ciris_billing_proxy import CreditProvider

        class Provider(CreditProvider):
            @classmethod
            def from_context(cls, context):
                raise RuntimeError("secret-in-message")
            async def credit_status(self, identity): ...
            async def spend(self, identity, key): ...
            async def give_back(self, identity, key): ...
        """,
        "method from_context raised RuntimeError",
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_serve_names_the_provider_the_method_and_the_problem_in_one_line(tmp_path: Path, kind: str) -> None:
    source, words = BROKEN[kind]
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "wallet-credits", "wallet_credits", source, "wallet = wallet_credits:Provider")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ciris_billing_proxy",
            "serve",
            "--provider",
            "wallet",
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=str(site)),
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'wallet'" in lines[0]
    assert words in lines[0]
    assert "secret-in-message" not in result.stderr


class WrongTypes(ShopProvider):
    answer: Any = None

    async def credit_status(self, identity: Identity) -> Any:
        return self.answer

    async def initiate_purchase(self, identity: Identity, return_url: str | None, key: str | None) -> Any:
        return {"payment_id": "pi_1"}


@pytest.mark.parametrize("answer", [None, {"has_credit": True}], ids=["None", "a dict"])
async def test_a_wrong_return_type_is_a_503_and_one_error_naming_it(
    make_client: ClientFactory,
    tmp_path: Path,
    tokens: TokenFactory,
    caplog: pytest.LogCaptureFixture,
    answer: Any,
) -> None:
    provider = WrongTypes(credits=3)
    provider.answer = answer
    client = await make_client(make_config(tmp_path), provider=provider)
    with caplog.at_level(logging.ERROR):
        for path, method in ((CREDITS, client.get), (INITIATE, client.post)):
            resp = await method(path, headers=tokens.headers(email="a@example.com"))
            assert resp.status == 503
            assert await resp.json() == {"detail": "Billing service unavailable"}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert "'shop' returned" in errors[0]
    assert "from credit_status; expected CreditStatus" in errors[0]
    assert "returned dict from initiate_purchase; expected PurchaseInitiated" in errors[1]
    assert not any(r.exc_info for r in caplog.records)


def test_the_interface_names_every_method_it_checks() -> None:
    from ciris_billing_proxy.providers.registry import ASYNC_METHODS

    for method in ASYNC_METHODS:
        assert callable(getattr(CreditProvider, method))
