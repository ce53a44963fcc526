"""Ending every session of a user: per-user token epochs (issue #17, item 2).

Moved by `POST /v1/auth/logout` with `{"everywhere": true}`, by `ciris-billing-proxy users logout NAME`
and by a restart with a new password; tokens issued before are refused by every process on the store.
Before, a restart with `--user alice:NewPassword` left alice's old token reading credits and spending.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.client import BillingClient
from ciris_billing_proxy.store.feed_sqlite import SQLiteChangeFeed
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.demo import USERS_FILE
from ciris_billing_proxy.tools.users import UserStore, end_sessions_of_new_passwords, hash_password

from .conftest import SECRET, ClientFactory, make_config
from .default_paths import CREDITS, LOGOUT, ME
from .serving import COMMAND, Server, clean_env, login, serve
from .test_auth_routes import authenticate, bearer
from .test_auth_routes import login as login_as

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

Client = TestClient[web.Request, web.Application]
INTERACT = "/v1/agent/interact"
#: The change feed's freshness bound, with room for a loaded machine.
FRESHNESS = 5.0


async def status_soon(client: Client, token: str, expected: int) -> int:
    """The status of `GET /credits` with `token` once it is `expected`, or after `FRESHNESS`."""
    deadline = time.monotonic() + FRESHNESS
    while True:
        status = (await client.get(CREDITS, headers=bearer(token))).status
        if status == expected or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


async def test_logout_everywhere_ends_every_session_of_the_user_in_every_process(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    a = await make_client(config, authenticate=authenticate)
    b = await make_client(config, authenticate=authenticate)  # another process on the same store
    phone, laptop, other = await login_as(a, "ann"), await login_as(a, "ann"), await login_as(a, "root")
    for client in (a, b):  # each token verified, so cached, in both processes
        for token in (phone, laptop, other):
            assert (await client.get(CREDITS, headers=bearer(token))).status == 200
    reply = await a.post(LOGOUT, json={"everywhere": True}, headers=bearer(phone))
    assert (reply.status, await reply.json()) == (200, {"status": "logged_out"})
    for token in (phone, laptop):
        answer = await a.get(CREDITS, headers=bearer(token))
        assert (answer.status, await answer.json()) == (401, {"detail": "Invalid token"})
        assert await status_soon(b, token, 401) == 401
    assert (await a.get(CREDITS, headers=bearer(other))).status == 200  # other users keep theirs
    assert (await b.get(CREDITS, headers=bearer(other))).status == 200
    fresh = await login_as(a, "ann")  # signing in again works at once, in every process
    assert (await a.get(CREDITS, headers=bearer(fresh))).status == 200
    assert (await b.get(CREDITS, headers=bearer(fresh))).status == 200
    later = await make_client(config, authenticate=authenticate)  # started afterwards: from the store
    assert (await later.get(CREDITS, headers=bearer(laptop))).status == 401
    assert (await later.get(CREDITS, headers=bearer(fresh))).status == 200


async def test_a_plain_logout_still_ends_only_the_presented_token(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    client = await make_client(config, authenticate=authenticate)
    one, two = await login_as(client, "ann"), await login_as(client, "ann")
    assert (await client.post(LOGOUT, json={"everywhere": False}, headers=bearer(one))).status == 200
    assert (await client.get(CREDITS, headers=bearer(one))).status == 401
    assert (await client.get(CREDITS, headers=bearer(two))).status == 200
    bad = await client.post(LOGOUT, json={"everywhere": "yes please"}, headers=bearer(two))
    assert bad.status == 422
    assert (await client.get(CREDITS, headers=bearer(two))).status == 200


async def test_after_an_epoch_a_token_without_iat_is_refused_for_that_user_only(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    """Tokens issued elsewhere must carry `iat` to survive a logout everywhere of their user."""
    client = await make_client(config, authenticate=authenticate)
    exp = int(time.time()) + 600
    no_iat = {
        name: jwt.encode({"sub": name, "exp": exp}, SECRET, algorithm="HS256") for name in ("ann", "bob")
    }
    assert (await client.get(CREDITS, headers=bearer(no_iat["ann"]))).status == 200
    ann = await login_as(client, "ann")
    assert (await client.post(LOGOUT, json={"everywhere": True}, headers=bearer(ann))).status == 200
    assert (await client.get(CREDITS, headers=bearer(no_iat["ann"]))).status == 401
    assert (await client.get(CREDITS, headers=bearer(no_iat["bob"]))).status == 200
    tokens = TokenFactory(config)  # a token issued elsewhere after the epoch, with `iat`: valid
    assert (await client.get(CREDITS, headers=tokens.headers("ann"))).status == 200


async def test_logout_everywhere_on_postgres_reaches_the_other_process(
    make_client: ClientFactory, pg_url: str, tmp_path: Path
) -> None:
    a = await make_client(make_config(tmp_path / "a", database_url=pg_url), authenticate=authenticate)
    b = await make_client(make_config(tmp_path / "b", database_url=pg_url), authenticate=authenticate)
    token, kept = await login_as(a, "ann"), await login_as(a, "root")
    assert (await b.get(CREDITS, headers=bearer(token))).status == 200
    assert (await a.post(LOGOUT, json={"everywhere": True}, headers=bearer(token))).status == 200
    assert await status_soon(b, token, 401) == 401
    assert (await b.get(CREDITS, headers=bearer(kept))).status == 200


async def test_the_python_client_logs_out_everywhere(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    app = await make_client(config, authenticate=authenticate)
    other = await login_as(app, "ann")
    url = str(app.make_url(""))
    async with BillingClient(url) as client:
        await client.login("ann", "pw-ann")
        await client.logout(everywhere=True)
        assert client.token is None
    assert (await app.get(ME, headers=bearer(other))).status == 401


async def test_changed_passwords_from_every_source() -> None:
    users = UserStore()
    users.add("same", "pw-same")
    users.add("new", "pw-new")
    users.add("first", "pw-first")
    recorded = {"same": hash_password("pw-same"), "new": hash_password("pw-old")}
    before = dict(recorded)
    assert await users.changed_passwords(recorded) == ["new"]
    assert users.password_hashes()["same"] == before["same"]  # kept, so the next start compares equal
    from_file = UserStore.load_rows(
        [{"username": "same", "password_hash": before["same"], "role": "OBSERVER"}]
    )
    assert await from_file.changed_passwords(before) == []
    rotated = UserStore.load_rows(
        [{"username": "same", "password_hash": hash_password("x"), "role": "OBSERVER"}]
    )
    assert await rotated.changed_passwords(before) == ["same"]


async def test_end_sessions_of_new_passwords_moves_epochs_in_the_store(tmp_path: Path) -> None:
    store = tmp_path / "changes.sqlite3"
    first = UserStore()
    first.add("alice", "one")
    assert await end_sessions_of_new_passwords(first, SQLiteChangeFeed(store), "local") == []
    again = UserStore()
    again.add("alice", "one")
    assert await end_sessions_of_new_passwords(again, SQLiteChangeFeed(store), "local") == []
    changed = UserStore()
    changed.add("alice", "two")
    started = time.time()
    assert await end_sessions_of_new_passwords(changed, SQLiteChangeFeed(store), "local") == ["alice"]
    assert time.time() >= int(started) + 1  # returns once the epoch has come


async def credits_and_interact(server: Server, token: str) -> tuple[int, int]:
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}{CREDITS}", headers=auth) as r:
            read = r.status
        async with session.post(f"{server.url}{INTERACT}", json={"message": "hi"}, headers=auth) as r:
            spent = r.status
    return read, spent


async def sign_in(server: Server, name: str, password: str) -> str:
    async with aiohttp.ClientSession() as session:
        return await login(session, server.url, name, password)


async def test_a_restart_with_a_new_password_ends_the_old_sessions(tmp_path: Path) -> None:
    with serve(["--user", "alice:OldPassword"], tmp_path) as server:
        old = await sign_in(server, "alice", "OldPassword")
        assert await credits_and_interact(server, old) == (200, 200)
    with serve(["--user", "alice:OldPassword"], tmp_path) as server:  # the same password: kept
        assert await credits_and_interact(server, old) == (200, 200)
    with serve(["--user", "alice:NewPassword"], tmp_path) as server:
        assert await credits_and_interact(server, old) == (401, 401)
        new = await sign_in(server, "alice", "NewPassword")
        assert await credits_and_interact(server, new) == (200, 200)
    assert "Ended every session of user alice" not in "".join(server.output)  # INFO: not shown by default


async def test_a_new_hash_in_the_users_file_ends_the_old_sessions(tmp_path: Path) -> None:
    users_file = tmp_path / USERS_FILE
    with serve([], tmp_path) as server:
        banner = "".join(server.output)
        password = banner.split("Created demo user demo with password ", 1)[1].split()[0]
        old = await sign_in(server, "demo", password)
    rows = json.loads(users_file.read_text())
    rows[0]["password_hash"] = hash_password("rotated-password")
    users_file.write_text(json.dumps(rows))
    with serve([], tmp_path) as server:
        assert await credits_and_interact(server, old) == (401, 401)
        assert await credits_and_interact(server, await sign_in(server, "demo", "rotated-password")) == (
            200,
            200,
        )


async def test_users_logout_on_the_command_line_ends_the_sessions_of_a_running_agent(tmp_path: Path) -> None:
    with serve(["--user", "alice:pw-a", "--user", "bob:pw-b"], tmp_path) as server:
        alice, bob = await sign_in(server, "alice", "pw-a"), await sign_in(server, "bob", "pw-b")
        assert await credits_and_interact(server, alice) == (200, 200)
        done = await asyncio.to_thread(
            subprocess.run,
            [*COMMAND, "users", "logout", "alice", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "Ended every session of alice" in done.stdout
        for _ in range(int(FRESHNESS / 0.05)):  # within the freshness bound
            if (await credits_and_interact(server, alice))[0] == 401:
                break
            await asyncio.sleep(0.05)
        assert await credits_and_interact(server, alice) == (401, 401)
        assert await credits_and_interact(server, bob) == (200, 200)
        assert await credits_and_interact(server, await sign_in(server, "alice", "pw-a")) == (200, 200)


def test_users_logout_with_an_unreachable_store_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [*COMMAND, "users", "logout", "alice", "--database-url", "postgresql://nobody@127.0.0.1:1/none"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
