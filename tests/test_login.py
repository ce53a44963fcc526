"""`POST /v1/auth/login` and the password user store, per docs/compatibility.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, ConfigError, setup_billing
from ciris_billing_proxy.tools.users import UserStore, hash_password, verify_password

from .conftest import ClientFactory, make_config
from .default_paths import CREDITS, LOGIN


@pytest.fixture
def users() -> UserStore:
    store = UserStore()
    store.add("ann", "correct horse", email="ann@example.com")
    store.add("root", "battery staple", role="admin")
    return store


async def test_login_reply_is_the_bare_five_key_object(
    make_client: ClientFactory, config: BillingConfig, users: UserStore
) -> None:
    client = await make_client(config, authenticate=users.verify_login)
    resp = await client.post(
        LOGIN,
        json={"username": "ann", "password": "correct horse"},
        headers={"Authorization": "Bearer stale.token.here"},
    )
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "user_id", "role"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert (body["user_id"], body["role"]) == ("ann", "OBSERVER")
    credits = await client.get(CREDITS, headers={"Authorization": f"Bearer {body['access_token']}"})
    assert credits.status == 200


async def test_roles_are_upper_case(
    make_client: ClientFactory, config: BillingConfig, users: UserStore
) -> None:
    client = await make_client(config, authenticate=users.verify_login)
    body = await (await client.post(LOGIN, json={"username": "root", "password": "battery staple"})).json()
    assert body["role"] == "ADMIN"


@pytest.mark.parametrize(
    "creds", [{"username": "ann", "password": "wrong"}, {"username": "nobody", "password": "correct horse"}]
)
async def test_bad_credentials(
    make_client: ClientFactory, config: BillingConfig, users: UserStore, creds: dict[str, str]
) -> None:
    client = await make_client(config, authenticate=users.verify_login)
    resp = await client.post(LOGIN, json=creds)
    assert resp.status == 401
    assert await resp.json() == {"detail": "Invalid credentials"}


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"{oops", 400),
        (b"", 400),
        (b'{"username": "ann"}', 422),
        (b'{"username": 1, "password": 2}', 422),
        (b"[]", 422),
        (b'{"username": "' + b"a" * 20000 + b'", "password": "x"}', 413),
    ],
)
async def test_malformed_login_bodies(
    make_client: ClientFactory, config: BillingConfig, users: UserStore, data: bytes, status: int
) -> None:
    client = await make_client(config, authenticate=users.verify_login)
    resp = await client.post(LOGIN, data=data, headers={"Content-Type": "application/json"})
    assert resp.status == status
    assert "detail" in await resp.json()


async def test_wrong_method_is_json_405(
    make_client: ClientFactory, config: BillingConfig, users: UserStore
) -> None:
    client = await make_client(config, authenticate=users.verify_login)
    resp = await client.get(LOGIN)
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"
    assert await resp.json() == {"detail": "Method Not Allowed"}


async def test_a_failing_authenticator_is_a_plain_500(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    async def broken(username: str, password: str) -> None:
        raise RuntimeError("db password is hunter2")

    client = await make_client(config, authenticate=broken)
    resp = await client.post(LOGIN, json={"username": "a", "password": "b"})
    assert resp.status == 500
    assert await resp.json() == {"detail": "Internal server error"}


async def test_no_login_route_unless_asked(billing_client: object) -> None:
    resp = await billing_client.post(LOGIN, json={"username": "a", "password": "b"})  # type: ignore[attr-defined]
    assert resp.status == 404


def test_login_needs_a_signing_key(tmp_path: Path, users: UserStore) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    config = make_config(tmp_path, jwt={"algorithms": ["ES256"], "public_key": public.decode()})
    with pytest.raises(ConfigError, match="login route needs"):
        setup_billing(web.Application(), config, authenticate=users.verify_login, environ={})


def test_user_store_keeps_hashes_only(tmp_path: Path, users: UserStore) -> None:
    path = tmp_path / "users.json"
    users.save(path)
    text = path.read_text()
    assert "correct horse" not in text
    assert json.loads(text)[0]["password_hash"].startswith("scrypt$")
    assert path.stat().st_mode & 0o077 == 0
    assert "ann" in UserStore.load(path)


def test_password_hashes() -> None:
    encoded = hash_password("pw")
    assert verify_password("pw", encoded)
    assert not verify_password("pw2", encoded)
    assert hash_password("pw") != encoded  # salted
    assert not verify_password("pw", "garbage")
    assert not verify_password("pw", "bcrypt$1$2$3$AA==$AA==")
