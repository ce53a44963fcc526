"""The user's ID token from the agent's environment (`id_token_from_env`), as the CIRIS apps set it:
no header on any request, the token in `CIRIS_BILLING_GOOGLE_ID_TOKEN` through the agent's `.env`
file, picked up again when the app rewrites it, and a refresh signal when the backend refuses it."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.id_token import GOOGLE_HEADER
from ciris_billing_proxy.providers.ciris.agent_token import AgentToken, parse_env_file
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory
from ciris_billing_proxy.testing.fake_backend import fake_id_token

from .ciris_helpers import INTERACT, agent_routes
from .conftest import ClientFactory
from .default_paths import CREDITS, GOOGLE_PLAY

REFUSED = {"detail": "The billing backend did not accept the ID token; sign in again"}


def id_token_config(config: BillingConfig, **options: Any) -> BillingConfig:
    kept = {k: v for k, v in config.provider_options.items() if k != "api_key"}
    return config.model_copy(update={"provider_options": {**kept, "auth_mode": "id_token", **options}})


def write_env(path: Path, token: str) -> None:
    path.write_text(f"# written by the app\nexport CIRIS_BILLING_GOOGLE_ID_TOKEN='{token}'\nOTHER=1\n")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_env_file_is_read_again_when_it_changes_and_at_most_once_a_second(tmp_path: Path) -> None:
    env_file, clock = tmp_path / ".env", Clock()
    agent = AgentToken({"CIRIS_BILLING_APPLE_ID_TOKEN": "from-env"}, env_file, tmp_path / "sig", clock)
    first = agent.current()
    assert first is not None
    assert (first.value, first.header, first.from_agent) == ("from-env", "X-Apple-ID-Token", True)
    write_env(env_file, "token-1")
    assert agent.current() == first  # looked less than a second ago
    clock.now += 1.0
    second = agent.current()
    assert second is not None
    assert (second.value, second.header) == ("token-1", GOOGLE_HEADER)
    write_env(env_file, "token-22")  # another size: a change even within the file system's mtime grain
    clock.now += 0.5
    assert agent.current() == second
    clock.now += 0.5
    third = agent.current()
    assert third is not None
    assert third.value == "token-22"
    assert "token" not in repr(third)


def test_env_file_lines_as_dotenv_writes_them() -> None:
    text = "A=1\n# c\nexport B=\"two words\"\nC='q'\nbroken line\n D = spaced \n"
    assert parse_env_file(text) == {"A": "1", "B": "two words", "C": "q", "D": "spaced"}


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    return tmp_path / "home" / ".env"


async def test_without_a_header_the_agents_token_is_used_and_refreshed_through_the_env_file(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    env_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = ciris_fake_backend
    env_file.parent.mkdir()
    signal = env_file.with_name(".token_refresh_needed")
    write_env(env_file, fake_id_token("google", "expired"))
    config = id_token_config(ciris_billing_config, id_token_from_env=True, env_file=str(env_file))
    client = await make_client(config, host=agent_routes)
    auth = TokenFactory(config).headers("frank")  # no ID-token header, as the CIRIS apps send

    with caplog.at_level(logging.DEBUG):
        refused = await client.get(CREDITS, headers=auth)
        assert refused.status == 401
        assert await refused.json() == REFUSED
        assert float(signal.read_text()) > 0  # the app's cue to sign in again and rewrite .env

        subject = secrets.token_hex(8)
        fresh = fake_id_token("google", subject)
        write_env(env_file, fresh)
        await asyncio.sleep(1.05)  # the file is looked at once a second at most
        credit = await client.get(CREDITS, headers=auth)
        assert credit.status == 200
        assert (await credit.json())["has_credit"] is True
        assert fake.account("oauth:google", subject)["free_uses_remaining"] == 10
        assert (await client.post(INTERACT, json={}, headers=auth)).status == 200
        body = {
            "purchase_token": "gp-" + secrets.token_hex(8),
            "product_id": "credits_100",
            "package_name": "a",
        }
        assert (await (await client.post(GOOGLE_PLAY, json=body, headers=auth)).json())["credits_added"] == 99
        assert fake.account("oauth:google", subject)["credits_remaining"] == 99
    assert fresh not in caplog.text
    assert fresh not in signal.read_text()


async def test_a_header_wins_over_the_agents_token(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    ciris_fake_backend: FakeBillingBackend,
    env_file: Path,
) -> None:
    env_file.parent.mkdir()
    write_env(env_file, fake_id_token("google", "agent-" + secrets.token_hex(4)))
    config = id_token_config(ciris_billing_config, id_token_from_env=True, env_file=str(env_file))
    client = await make_client(config, host=agent_routes)
    subject = secrets.token_hex(8)
    auth = {**TokenFactory(config).headers("gil"), GOOGLE_HEADER: fake_id_token("google", subject)}
    assert (await client.get(CREDITS, headers=auth)).status == 200
    assert fake_account_exists(ciris_fake_backend, subject)


def fake_account_exists(fake: FakeBillingBackend, subject: str) -> bool:
    return ("oauth:google", subject) in fake.ledger.accounts


async def test_it_is_opt_in(
    ciris_billing_config: BillingConfig,
    make_client: ClientFactory,
    env_file: Path,
) -> None:
    """Off by default: on a multi-user server it would bill every user to one account."""
    env_file.parent.mkdir()
    write_env(env_file, fake_id_token("google", "someone"))
    config = id_token_config(ciris_billing_config, env_file=str(env_file))
    client = await make_client(config, host=agent_routes)
    auth = TokenFactory(config).headers("hal")
    for method, path in (("GET", CREDITS), ("POST", INTERACT)):
        assert (await client.request(method, path, headers=auth, json={})).status == 401
