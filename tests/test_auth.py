"""Bearer-token auth: every way a token can be wrong, key confusion, and host-route coexistence."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from ciris_billing_proxy import BillingConfig, ConfigError, JWTConfig, get_identity, setup_billing
from ciris_billing_proxy.testing import TokenFactory

from .conftest import SECRET, ClientFactory, make_config
from .default_paths import BILLING, CREDITS


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built byte by byte, so it can carry what PyJWT refuses to produce."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def rsa_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


async def status_and_detail(
    client: Any, token: str | None = None, header: str | None = None
) -> tuple[int, Any]:
    headers = {}
    if header is not None:
        headers["Authorization"] = header
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    resp = await client.get(CREDITS, headers=headers)
    return resp.status, (await resp.json())["detail"] if resp.status != 200 else None


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc.def.ghi", "Bearer a.b.c extra", "bearer"],
)
async def test_missing_or_malformed_header_is_not_authenticated(billing_client: Any, header: str) -> None:
    resp = await billing_client.get(CREDITS, headers={"Authorization": header} if header else {})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert await resp.json() == {"detail": "Not authenticated"}


async def test_scheme_is_case_insensitive(billing_client: Any, tokens: TokenFactory) -> None:
    status, _ = await status_and_detail(billing_client, header=f"bearer {tokens.token()}")
    assert status == 200


async def test_garbage_token_is_invalid(billing_client: Any) -> None:
    resp = await billing_client.get(CREDITS, headers={"Authorization": "Bearer abc.def.ghi"})
    assert resp.status == 401
    assert await resp.json() == {"detail": "Invalid token"}
    assert "invalid_token" in resp.headers["WWW-Authenticate"]


async def test_expired_token(billing_client: Any, tokens: TokenFactory) -> None:
    assert await status_and_detail(billing_client, tokens.token(ttl=-60)) == (401, "Token expired")


async def test_expired_within_leeway_is_accepted(billing_client: Any, tokens: TokenFactory) -> None:
    assert (await status_and_detail(billing_client, tokens.token(ttl=-3)))[0] == 200


async def test_wrong_signature(billing_client: Any) -> None:
    other = jwt.encode({"sub": "u", "exp": time.time() + 60}, "another-secret-" + "y" * 40, algorithm="HS256")
    assert await status_and_detail(billing_client, other) == (401, "Invalid token")


async def test_tampered_payload(billing_client: Any, tokens: TokenFactory) -> None:
    header, _, signature = tokens.token("alice").split(".")
    forged = b64(json.dumps({"sub": "admin", "exp": int(time.time()) + 60}).encode())
    assert await status_and_detail(billing_client, f"{header}.{forged}.{signature}") == (401, "Invalid token")


async def test_alg_none_is_rejected(billing_client: Any) -> None:
    token = handmade({"alg": "none", "typ": "JWT"}, {"sub": "u", "exp": int(time.time()) + 60}, None)
    assert await status_and_detail(billing_client, token) == (401, "Invalid token")


@pytest.mark.parametrize("drop", ["exp", "sub"])
async def test_required_claims(billing_client: Any, tokens: TokenFactory, drop: str) -> None:
    token = jwt.encode({k: v for k, v in tokens.claims().items() if k != drop}, SECRET, algorithm="HS256")
    assert await status_and_detail(billing_client, token) == (401, "Invalid token")


@pytest.mark.parametrize("claims", [{"sub": 42}, {"sub": ""}, {"nbf": int(time.time()) + 600}])
async def test_bad_claim_values(billing_client: Any, tokens: TokenFactory, claims: dict[str, Any]) -> None:
    token = jwt.encode({**tokens.claims(), **claims}, SECRET, algorithm="HS256")
    assert await status_and_detail(billing_client, token) == (401, "Invalid token")


async def test_hs256_token_signed_with_the_public_key_is_rejected(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    private, public = rsa_pair()
    config = make_config(tmp_path, jwt={"algorithms": ["RS256"], "public_key": public.decode()})
    client = await make_client(config)
    claims = {"sub": "u", "exp": int(time.time()) + 60}
    good = jwt.encode(claims, private, algorithm="RS256")
    assert (await status_and_detail(client, good))[0] == 200
    confused = handmade({"alg": "HS256", "typ": "JWT"}, claims, public)
    assert await status_and_detail(client, confused) == (401, "Invalid token")


async def test_es256_public_key(make_client: ClientFactory, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    config = make_config(tmp_path, jwt={"algorithms": ["ES256"], "public_key": public.decode()})
    client = await make_client(config)
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    assert (await status_and_detail(client, token))[0] == 200
    hs = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert await status_and_detail(client, hs) == (401, "Invalid token")


async def test_issuer_and_audience(make_client: ClientFactory, tmp_path: Path) -> None:
    config = make_config(
        tmp_path, jwt={"secret": SECRET, "issuer": "https://id.example", "audience": "agent"}
    )
    client = await make_client(config)
    factory = TokenFactory(config)
    assert (await status_and_detail(client, factory.token()))[0] == 200
    for wrong in ({"iss": "https://evil.example"}, {"aud": "other"}, {"iss": None}, {"aud": None}):
        token = jwt.encode({k: v for k, v in {**factory.claims(), **wrong}.items() if v is not None}, SECRET)
        assert await status_and_detail(client, token) == (401, "Invalid token"), wrong


@pytest.mark.parametrize(
    "jwt_settings",
    [
        {"secret": "short"},
        {"algorithms": ["none"], "secret": SECRET},
        {"algorithms": ["HS256", "RS256"], "secret": SECRET, "public_key": "x"},
        {"algorithms": ["RS256"]},
        {"secret": SECRET, "public_key": "-----BEGIN PUBLIC KEY-----"},
        {"algorithms": [], "secret": SECRET},
    ],
)
def test_unsafe_jwt_settings_fail_at_startup(jwt_settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JWTConfig(**jwt_settings)


def test_an_unparseable_public_key_fails_at_setup(tmp_path: Path) -> None:
    config = make_config(tmp_path, jwt={"algorithms": ["RS256"], "public_key": "not a pem"})
    with pytest.raises(ConfigError, match="public key"):
        setup_billing(web.Application(), config, environ={})


def _host_routes(app: web.Application) -> None:
    async def public(request: web.Request) -> web.Response:
        return web.json_response({"public": True})

    async def whoami(request: web.Request) -> web.Response:
        identity = get_identity(request)
        return web.json_response(
            {
                "user_id": identity.user_id,
                "namespace": identity.namespace,
                "role": identity.role,
                "email": identity.email,
                "tenant": identity.tenant,
            }
        )

    app.router.add_get("/public", public)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/v1/agent/status", public)


async def test_host_routes_stay_open_and_share_the_identity(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, host=_host_routes)
    assert (await client.get("/public")).status == 200
    assert (await client.get("/v1/agent/status")).status == 200
    assert (await client.get("/whoami")).status == 401
    token = tokens.token(
        "ann", email="ann@example.com", role="admin", tenant="t1", oauth_provider="oauth:google"
    )
    resp = await client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
    assert await resp.json() == {
        "user_id": "ann",
        "namespace": "google",
        "role": "ADMIN",
        "email": "ann@example.com",
        "tenant": "t1",
    }


async def test_host_can_protect_its_own_paths(
    make_client: ClientFactory, tmp_path: Path, tokens: TokenFactory
) -> None:
    config = make_config(tmp_path, protected_paths=("/v1/agent",))
    client = await make_client(config, host=_host_routes)
    assert (await client.get("/public")).status == 200
    resp = await client.get("/v1/agent/status")
    assert resp.status == 401
    assert await resp.json() == {"detail": "Not authenticated"}
    assert (await client.get("/v1/agent/status", headers=tokens.headers())).status == 200


async def test_cors_preflight_is_not_blocked_by_auth(billing_client: Any) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "GET"}
    resp = await billing_client.options(CREDITS, headers=preflight)
    assert resp.status != 401


async def test_app_wide_placement_without_subapp(
    make_client: ClientFactory, config: BillingConfig, tokens: TokenFactory
) -> None:
    client = await make_client(config, host=_host_routes, subapp=False)
    assert (await client.get("/public")).status == 200
    assert (await client.get(CREDITS)).status == 401
    assert (await client.get(CREDITS, headers=tokens.headers())).status == 200
    resp = await client.get(f"{BILLING}/nothing-here", headers=tokens.headers())
    assert resp.status == 404
    assert await resp.json() == {"detail": "Not Found"}


def test_every_allowed_algorithm_must_fit_the_key(tmp_path: Path) -> None:
    _, public = rsa_pair()
    config = make_config(tmp_path, jwt={"algorithms": ["RS256", "ES256"], "public_key": public.decode()})
    with pytest.raises(ConfigError, match="cannot be used with ES256"):
        setup_billing(web.Application(), config, environ={})


def test_weak_keys_fail_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at least 64 bytes"):
        JWTConfig(secret="s" * 40, algorithms=("HS512",))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    small = weak.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    config = make_config(tmp_path, jwt={"algorithms": ["RS256"], "public_key": small.decode()})
    with pytest.raises(ConfigError, match="too short"):
        setup_billing(web.Application(), config, environ={})


async def test_forged_algorithm_header_for_an_unfit_key_is_just_invalid(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    _, public = rsa_pair()
    client = await make_client(
        make_config(tmp_path, jwt={"algorithms": ["RS256"], "public_key": public.decode()})
    )
    for alg in ("ES256", "HS512", "PS256", "EdDSA"):
        token = (
            handmade({"alg": alg, "typ": "JWT"}, {"sub": "u", "exp": int(time.time()) + 60}, None) + "AAAA"
        )
        assert await status_and_detail(client, token) == (401, "Invalid token"), alg


@pytest.mark.parametrize("exp", [10**309, str(int(time.time()) + 3600), True, 2**60, [1]])
async def test_exp_must_be_a_sane_number(billing_client: Any, tokens: TokenFactory, exp: Any) -> None:
    token = jwt.encode({**tokens.claims(), "exp": exp}, SECRET, algorithm="HS256")
    status, detail = await status_and_detail(billing_client, token)
    assert status == 401
    assert detail in ("Invalid token", "Token expired")  # PyJWT reads True as 1 (1970)


async def test_an_expired_token_is_refused_even_when_cached_as_valid(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(tmp_path, jwt={"secret": SECRET, "leeway_seconds": 0})
    client = await make_client(config)
    token = TokenFactory(config).token(ttl=1)
    assert (await status_and_detail(client, token))[0] == 200  # verified and cached
    assert (await status_and_detail(client, token))[0] == 200  # served from the cache
    await asyncio.sleep(1.6)
    assert await status_and_detail(client, token) == (401, "Token expired")


def test_the_token_cache_checks_expiry_and_revocation_on_every_hit(tmp_path: Path) -> None:
    from ciris_billing_proxy.auth import AuthError, TokenVerifier

    now = [time.time()]
    config = make_config(tmp_path, jwt={"secret": SECRET, "leeway_seconds": 5})
    verifier = TokenVerifier(config, clock=lambda: now[0])
    factory = TokenFactory(config)
    token = factory.token(ttl=60)
    assert verifier.verify(token).user_id == "user-1"
    now[0] += 64  # inside the leeway
    assert verifier.verify(token).user_id == "user-1"
    now[0] += 2
    with pytest.raises(AuthError, match="Token expired"):
        verifier.verify(token)
    other = factory.token("user-2", ttl=60)
    now[0] = time.time()
    verifier.verify(other)
    verifier.revoke(other)
    with pytest.raises(AuthError, match="Invalid token"):
        verifier.verify(other)


def test_a_cached_header_skips_the_bearer_pattern_but_not_revocations_or_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's header is looked up whole before the pattern runs; every hit still checks the
    revocations (made here or, by digest, in another process) and epochs drop its entry."""
    from hashlib import blake2b

    from ciris_billing_proxy import auth

    matched: list[str] = []
    pattern = auth._BEARER

    class Counting:
        def match(self, text: str) -> Any:
            matched.append(text)
            return pattern.match(text)

    monkeypatch.setattr(auth, "_BEARER", Counting())
    config = make_config(tmp_path)
    verifier = auth.TokenVerifier(config)
    factory = TokenFactory(config)
    token, other, third = factory.token("ann"), factory.token("bob"), factory.token("cat", iat=1)
    header = f"bearer   {token}"  # any spelling the pattern accepts is cached as it came
    assert verifier.verify_header(header) == verifier.verify_header(header) == verifier.verify(token)
    assert len(matched) == 1
    assert verifier.verify_header("Basic Zm9vOmJhcg==") is None
    assert verifier.verify_header("Basic Zm9vOmJhcg==") is None  # refused, never cached
    assert len(matched) == 3
    verifier.revoke_digest(blake2b(token.encode(), digest_size=16).digest(), time.time() + 60)
    with pytest.raises(auth.AuthError, match="Invalid token"):
        verifier.verify_header(header)
    with pytest.raises(auth.AuthError, match="Invalid token"):
        verifier.verify(token)
    assert verifier.verify_header(f"Bearer {other}").user_id == "bob"
    verifier.revoke(other)
    with pytest.raises(auth.AuthError, match="Invalid token"):
        verifier.verify_header(f"Bearer {other}")
    assert verifier.verify_header(f"Bearer {third}").user_id == "cat"
    verifier.move_epoch(verifier.verify(third).key, time.time())
    with pytest.raises(auth.AuthError, match="Invalid token"):
        verifier.verify_header(f"Bearer {third}")


def test_a_good_headers_digest_is_remembered_within_a_bound_and_never_decides_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest of a header found good is computed once; the headers remembered stay within
    `HEADER_KEYS_MAX` (emptied when full) and are only ever the headers of good tokens; a header
    remembered whose entry has left the token cache (evicted, expired, revoked) is not served."""
    from ciris_billing_proxy import auth

    digests: list[bytes] = []
    real = auth.blake2b

    def counting(data: bytes, **kwargs: Any) -> Any:
        digests.append(data)
        return real(data, **kwargs)

    monkeypatch.setattr(auth, "blake2b", counting)
    monkeypatch.setattr(auth, "HEADER_KEYS_MAX", 2)
    config = make_config(tmp_path, token_cache_max_entries=2)
    verifier = auth.TokenVerifier(config)
    factory = TokenFactory(config)
    ann, bob, cat = (f"Bearer {factory.token(user)}" for user in ("ann", "bob", "cat"))
    assert verifier.verify_header(ann) is not None  # verified in full, cached
    digests.clear()
    for _ in range(3):
        assert verifier.cached_identity(ann) is not None
    assert len(digests) == 1  # the first hit; the others found it remembered
    assert verifier.cached_identity("Bearer a.b.c") is None  # nothing cached: not remembered
    assert verifier.verify_header(bob) is not None
    assert verifier.cached_identity(bob) is not None
    assert set(verifier._keys) == {ann, bob}
    assert verifier.verify_header(cat) is not None  # evicts ann (two entries at most)
    assert verifier.cached_identity(ann) is None  # remembered, but no longer cached: not served
    assert verifier.cached_identity(cat) is not None
    assert set(verifier._keys) == {cat}  # full: emptied, then cat's
    assert verifier.verify_header(ann) is not None  # checked in full again
    verifier.revoke(ann.removeprefix("Bearer "))
    assert verifier.cached_identity(ann) is None
    with pytest.raises(auth.AuthError, match="Invalid token"):
        verifier.verify_header(ann)


def test_a_header_too_long_to_remember_is_still_served_from_the_token_cache(tmp_path: Path) -> None:
    """One good token can arrive as many different headers (spaces after the scheme): only short
    ones are remembered, so what the memo holds stays bounded in bytes, not only in entries."""
    from ciris_billing_proxy import auth

    config = make_config(tmp_path)
    verifier = auth.TokenVerifier(config)
    token = TokenFactory(config).token("ann")
    padded = "Bearer" + " " * auth.HEADER_KEY_LENGTH_MAX + token
    assert verifier.verify_header(padded) is not None
    assert verifier.cached_identity(padded) is not None
    assert padded not in verifier._keys
    plain = f"Bearer {token}"
    assert verifier.verify_header(plain) is not None
    assert verifier.cached_identity(plain) is not None
    assert plain in verifier._keys


def test_the_token_cache_can_be_turned_off(tmp_path: Path) -> None:
    from ciris_billing_proxy.auth import TokenVerifier

    verifier = TokenVerifier(make_config(tmp_path, token_cache_max_entries=0))
    token = TokenFactory(make_config(tmp_path)).token()
    assert verifier.verify(token) == verifier.verify(token)
    assert verifier._verified is None
