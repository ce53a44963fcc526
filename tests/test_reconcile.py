"""`ciris-billing-proxy reconcile` as an operator runs it, on paid credits (`ciris` provider) owed
back in a PostgreSQL store: a dry run changes nothing, a real run refunds each exactly once, and
two runs at once never refund one give-back twice."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

from pydantic import SecretStr

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.testing import FakeBillingBackend, TokenFactory

from .ciris_helpers import INTERACT, agent_routes, paid_user, who
from .conftest import ClientFactory
from .postgres import fetch
from .serving import clean_env

RECONCILE = (sys.executable, "-m", "ciris_billing_proxy", "reconcile", "--provider", "ciris")


async def owe_paid_give_backs(
    make_client: ClientFactory,
    config: BillingConfig,
    fake: FakeBillingBackend,
    tokens: TokenFactory,
    count: int,
) -> None:
    """`count` failed interactions of one paying user whose refunds could not be made (the backend's
    listing failed), left owed by an app that then stopped."""
    client = await make_client(config, host=agent_routes)
    auth = await paid_user(client, fake, tokens, "payer", count + 2)
    fake.inject("error_500", endpoint="transactions")
    replies = await asyncio.gather(
        *(client.post(INTERACT, json={"fail": True}, headers=auth) for _ in range(count))
    )
    assert [reply.status for reply in replies] == [502] * count
    await client.close()
    fake.clear_faults()
    assert fake.account(*who("payer"))["credits_remaining"] == 2


async def run(args: list[str], fake: FakeBillingBackend) -> tuple[int, str]:
    env = clean_env(
        CIRIS_BILLING_API_URL=fake.url, CIRIS_BILLING_API_KEY=fake.api_key, CIRIS_AGENT_ID="test-agent"
    )
    process = await asyncio.create_subprocess_exec(
        *RECONCILE, *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


def refunds_by_key(fake: FakeBillingBackend) -> Counter[str]:
    """How often the backend was asked for each refund (by its idempotency key)."""
    return Counter(
        str(body["idempotency_key"])
        for endpoint, body, _ in list(fake.received)
        if endpoint == "credits" and body and body.get("transaction_type") == "refund"
    )


def with_database(config: BillingConfig, url: str, tmp_path: Path) -> BillingConfig:
    return config.model_copy(update={"database_url": SecretStr(url), "data_dir": tmp_path / "agent"})


async def test_a_dry_run_lists_what_is_owed_and_a_real_run_makes_it(
    pg_url: str,
    tmp_path: Path,
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    fake = ciris_fake_backend
    config = with_database(ciris_billing_config, pg_url, tmp_path)
    await owe_paid_give_backs(make_client, config, fake, ciris_tokens, 5)
    args = ["--database-url", pg_url, "--data-dir", str(tmp_path / "reconcile")]

    code, out = await run([*args, "--dry-run"], fake)
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0] == "5 give-back(s) owed:"
    assert lines[1] == "request key\tuser\tage\tattempts\twhy"
    assert [line.split("\t")[1:2] + line.split("\t")[4:] for line in lines[2:]] == [
        ["local:payer", "the interaction failed (HTTP 502)"]
    ] * 5
    keys = {line.split("\t")[0] for line in lines[2:]}
    assert keys == {str(row[0]) for row in await fetch(pg_url, "SELECT request_key FROM give_backs")}
    assert fake.account(*who("payer"))["credits_remaining"] == 2
    assert not refunds_by_key(fake)

    code, out = await run(args, fake)
    assert (code, out.splitlines()[-1]) == (0, "Made 5 give-back(s); 0 still owed."), out
    assert fake.account(*who("payer"))["credits_remaining"] == 7
    assert await fetch(pg_url, "SELECT count(*) FROM give_backs") == [(0,)]

    assert await run([*args, "--dry-run"], fake) == (0, "No give-backs are owed.\n")
    assert await run(args, fake) == (0, "No give-backs are owed.\n")


async def test_two_processes_never_make_one_give_back_twice(
    pg_url: str,
    tmp_path: Path,
    make_client: ClientFactory,
    ciris_billing_config: BillingConfig,
    ciris_fake_backend: FakeBillingBackend,
    ciris_tokens: TokenFactory,
) -> None:
    fake = ciris_fake_backend
    config = with_database(ciris_billing_config, pg_url, tmp_path)
    await owe_paid_give_backs(make_client, config, fake, ciris_tokens, 30)
    # Each refund is slow, so the two runs overlap for as long as there is work.
    fake.inject("latency", endpoint="transactions", seconds=0.05, times=1000)

    results = await asyncio.gather(
        *(run(["--database-url", pg_url, "--data-dir", str(tmp_path / name)], fake) for name in "ab")
    )
    assert all(code in (0, 1) for code, _ in results), results
    made = [int(out.splitlines()[-1].split()[1]) for _, out in results]
    assert sum(made) == 30, results
    refunds = refunds_by_key(fake)
    assert len(refunds) == 30
    assert set(refunds.values()) == {1}, refunds
    assert fake.account(*who("payer"))["credits_remaining"] == 32
    assert await fetch(pg_url, "SELECT count(*) FROM give_backs") == [(0,)]
