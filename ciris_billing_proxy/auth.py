"""Bearer-token verification, the identity it yields, the auth middleware, and token issuing for login."""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Container, Mapping
from hashlib import blake2b
from typing import Any, Final

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from jwt.algorithms import get_default_algorithms

from .config import BillingConfig, ConfigError, JWTConfig
from .errors import NOT_AUTHENTICATED, HTTPJSONError, client_gone, client_left, http_error
from .identity import Identity
from .keys import VERIFIED_KEY, billing_service
from .lru import LRU
from .ops.request_id import HEADER as REQUEST_ID_HEADER
from .ops.request_id import assign_request_id
from .paths import PathScope, as_scope

_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*)$")
_MAX_CLAIM = 255
_MAX_NAMESPACE = 64
_MAX_EXP = 2**53  # beyond this a number is no timestamp (and may not even fit a float)
#: Revocations are forgotten in batches: each at the first sweep after its token's expiry (plus the
#: leeway) rounded up to this many seconds. Sweeps happen as revocations are added, at most once per batch.
REVOCATION_BATCH_SECONDS: Final = 60
#: Headers whose cache key (their digest) `TokenVerifier` remembers, each at most
#: `HEADER_KEY_LENGTH_MAX` characters: 8 MiB of header text at most. One good token can arrive as
#: many headers (the scheme's case, the spaces around it), so the bound is on the headers.
HEADER_KEYS_MAX: Final = 4096
HEADER_KEY_LENGTH_MAX: Final = 2048

logger = logging.getLogger("ciris_billing_proxy")


class AuthError(Exception):
    """A token that must be refused; `detail` is the plain reason shown to the client."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class TokenVerifier:
    """Verifies bearer tokens against one key and one algorithm family, and issues tokens with it.

    A full verification (signature and claims) costs about as much as a whole bare aiohttp request,
    and clients send the same token on every call, so verified tokens are kept in a bounded LRU map,
    keyed by a 128-bit BLAKE2b digest of the `Authorization` header they came in (`Bearer <token>`
    for a token verified without a request; a collision would need a second header with the same
    digest: infeasible). A request whose header is cached skips even the bearer pattern: the very
    same header matched it before. Each entry keeps the token's own digest (what revocations name)
    beside the identity. A hit re-checks `exp` against the clock, with the same leeway as a full
    verification, and the revocation list; nothing else about a token can change while it is
    cached, because the key and the rules belong to this verifier (and moving a user's epoch drops
    the user's entries).
    """

    def __init__(self, config: BillingConfig, *, clock: Callable[[], float] = time.time) -> None:
        jwt_config = config.jwt
        self._clock = clock
        self._jwt = jwt_config
        self._leeway = jwt_config.leeway_seconds
        self._algorithms = list(jwt_config.algorithms)
        self._namespace = config.identity_namespace
        self._default_role = config.default_role
        self._verify_key: Any = _verify_key(jwt_config)
        # An HMAC secret signs as it verifies; only a private key needs preparing apart.
        self._signing_key: Any = self._verify_key if jwt_config.uses_hmac else _signing_key(jwt_config)
        self._options: dict[str, Any] = {"require": ["exp", "sub"]}
        self._verified: LRU[bytes, tuple[bytes, Identity]] | None = (
            LRU(config.token_cache_max_entries) if config.token_cache_max_entries else None
        )
        # The digest of each header whose token was found good lately: a pure function remembered,
        # so it can never disagree with `_verified`, which alone says what is good. A lookup by the
        # header costs its string hash where the digest costs about 5,000 instructions (a fifth
        # of the gap between a cached `GET /credits` and bare aiohttp). It holds raw tokens, at
        # most `HEADER_KEYS_MAX`, in this process's memory only (never logged or stored), as the
        # requests themselves do; the process holds the signing key anyway, which is worth more
        # than any token. Emptied when full: the cheapest bound, refilled by the next hits.
        self._keys: dict[str, bytes] = {}
        # Revoked token digests. A plain set: the hot path only asks "is anything revoked at all?"
        # and, rarely, "is this one?", both without Python frames. Every revocation is kept until
        # its token has expired, however many there are: dropping one early would let its token
        # back in (memory is bounded by how many tokens a user can get, `TokenIssueLimit`). They
        # are filed by expiry batch (`REVOCATION_BATCH_SECONDS`), so forgetting those of expired
        # tokens costs only those, and each costs a digest and two slots (see docs/security.md).
        self._revoked: set[bytes] = set()
        self._expiring: dict[int, list[bytes]] = {}
        self._next_sweep = math.inf
        # Per-user token epochs: a token of the user issued (`iat`) before it is refused. Checked
        # only when a token is decoded: moving an epoch drops the user's verified tokens, so a
        # cached one is never older than its user's epoch.
        self._epochs: dict[tuple[str, str], float] = {}

    @property
    def token_ttl_seconds(self) -> int:
        return self._jwt.token_ttl_seconds

    def verify(self, token: str) -> Identity:
        """The identity of a bare token (`AuthError` when it is refused), cached as the header
        `Bearer <token>` is."""
        header = "Bearer " + token
        key = _digest(header)
        return self.cached_identity(header) or self._recheck(key) or self._verify(token, key)

    def verify_header(self, header: str) -> Identity | None:
        """The identity of an `Authorization` header's bearer token (`AuthError` when the token is
        refused), or None when the header holds no bearer token. Looked up by the whole header
        first (`cached_identity`): a cached one costs a lookup or two, and no pattern is run."""
        return self.cached_identity(header) or self._verify_header(header)

    def cached_identity(self, header: str) -> Identity | None:
        """The identity of a header whose token is cached and still good (not expired, with the
        leeway; not revoked), else None: the hit path, run on every request, in one frame of C
        calls. None says nothing about the token: `verify_header` decides, and refuses it if so."""
        verified = self._verified
        if verified is None:
            return None
        key = self._keys.get(header)
        known = key is not None
        if key is None:
            key = blake2b(
                header.encode("utf-8", "surrogatepass"), digest_size=16
            ).digest()  # `_digest`, inline
        entry = verified.get(key)
        if entry is None:
            return None
        digest, identity = entry
        if (self._revoked and digest in self._revoked) or self._clock() - self._leeway >= identity.expires_at:
            return None
        verified.move_to_end(key)
        if not known and len(header) <= HEADER_KEY_LENGTH_MAX:
            if len(self._keys) >= HEADER_KEYS_MAX:
                self._keys.clear()
            self._keys[header] = key
        return identity

    def _verify_header(self, header: str) -> Identity | None:
        """A header `cached_identity` did not vouch for: refused as cached, or checked in full."""
        key = _digest(header)
        identity = self._recheck(key)
        if identity is not None:
            return identity
        match = _BEARER.match(header.strip())
        return None if match is None else self._verify(match.group(1), key)

    def _recheck(self, key: bytes) -> Identity | None:
        """The entry cached under `key` after `cached_identity` passed it over: `AuthError` when
        its token is revoked or expired (then dropped), else its identity (good again: a clock
        moved back), or None when nothing is cached under `key`."""
        verified = self._verified
        entry = None if verified is None else verified.get(key)
        if verified is None or entry is None:
            return None
        digest, identity = entry
        if self._revoked and digest in self._revoked:
            raise AuthError("Invalid token")
        if self._clock() - self._leeway < identity.expires_at:
            return identity
        del verified[key]
        raise AuthError("Token expired")

    def _verify(self, token: str, key: bytes) -> Identity:
        """A token not cached under `key`: checked in full, then cached under it."""
        digest = _digest(token)
        if self._revoked and digest in self._revoked:
            raise AuthError("Invalid token")
        identity = self._decode(token)
        if self._verified is not None:
            self._verified[key] = (digest, identity)
        return identity

    def revoke(self, token: str) -> tuple[bytes, float] | None:
        """Refuse this token from now on (e.g. at logout), cached or not; returns its digest and
        until when the revocation is kept, for sharing it (`revoke_digest` elsewhere).

        The revocation is kept only while the token would otherwise be accepted: until its `exp`
        plus the leeway, after which `verify` refuses it as expired anyway (it is forgotten within
        `REVOCATION_BATCH_SECONDS` after that). A token this verifier refuses already (bad
        signature, expired, revoked) needs no revocation and takes no memory (`None`). No
        revocation is ever forgotten before its token has expired, however many there are.
        """
        try:
            identity = self.verify(token)
        except AuthError:
            return None
        digest = _digest(token)
        until = identity.expires_at + self._jwt.leeway_seconds
        self.revoke_digest(digest, until)
        return digest, until

    def revoke_digest(self, digest: bytes, until: float) -> None:
        """Refuse the token with this digest until `until` (a revocation made by another process)."""
        now = self._clock()
        if until <= now or digest in self._revoked:
            return
        if now >= self._next_sweep:
            self._forget_expired(now)
        batch = math.ceil(until / REVOCATION_BATCH_SECONDS)
        self._expiring.setdefault(batch, []).append(digest)
        self._next_sweep = min(self._next_sweep, batch * REVOCATION_BATCH_SECONDS)
        # A cached entry of the token stays: every hit checks this set (with the token's digest).
        self._revoked.add(digest)

    def _forget_expired(self, now: float) -> None:
        for batch in [b for b in self._expiring if b * REVOCATION_BATCH_SECONDS <= now]:
            self._revoked.difference_update(self._expiring.pop(batch))
        self._next_sweep = min(self._expiring, default=math.inf) * REVOCATION_BATCH_SECONDS

    def move_epoch(self, user: tuple[str, str], epoch: float) -> None:
        """Refuse every token of `user` (namespace, user id) issued before `epoch` (seconds since
        the epoch), and any without an `iat`. An epoch never moves back."""
        if epoch <= self._epochs.get(user, -math.inf):
            return
        self._epochs[user] = epoch
        if self._verified is not None:
            # A scan, but a rare one: each move needs a password change, an operator, or a
            # logout everywhere with a fresh token (whose number `TokenIssueLimit` bounds).
            stale = [key for key, (_, identity) in self._verified.items() if identity.key == user]
            for key in stale:
                del self._verified[key]

    @property
    def revocations_kept(self) -> int:
        """How many revoked tokens this verifier refuses (for operators and tests)."""
        return len(self._revoked)

    def _decode(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=self._algorithms,
                options=self._options,  # type: ignore[arg-type]
                issuer=self._jwt.issuer,
                audience=self._jwt.audience,
                leeway=self._jwt.leeway_seconds,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("Token expired") from None
        except jwt.PyJWTError:
            raise AuthError("Invalid token") from None
        except Exception as exc:
            # Whatever a hostile token provokes inside the decoder is still just an invalid token.
            logger.warning("Token verification raised %s; refused", type(exc).__name__)
            raise AuthError("Invalid token") from None
        return self._identity(claims)

    def _identity(self, claims: dict[str, Any]) -> Identity:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 0 < len(sub) <= _MAX_CLAIM:
            raise AuthError("Invalid token")
        namespace = _optional_str(claims.get("oauth_provider")) or self._namespace
        namespace = namespace.removeprefix("oauth:") or self._namespace
        if len(namespace) > _MAX_NAMESPACE:  # it becomes part of backend identities, which have limits
            raise AuthError("Invalid token")
        role = _optional_str(claims.get("role")) or self._default_role
        tenant = _optional_str(claims.get("tenant")) or _optional_str(claims.get("tenant_id"))
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float) or not abs(exp) < _MAX_EXP:
            raise AuthError("Invalid token")
        if self._epochs:
            epoch = self._epochs.get((namespace, sub))
            if epoch is not None:
                iat = claims.get("iat")
                # No `iat`: nothing says the token is newer than the epoch, so it is not.
                if isinstance(iat, bool) or not isinstance(iat, int | float) or iat < epoch:
                    raise AuthError("Invalid token")
        return Identity(
            user_id=sub,
            namespace=namespace,
            role=role.upper(),
            email=_optional_str(claims.get("email")),
            tenant=tenant,
            expires_at=float(exp),
        )

    def issue(
        self,
        user_id: str,
        *,
        role: str,
        email: str | None = None,
        now: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign a token for a user this agent has authenticated itself (the auth routes). `extra`
        claims cannot replace the ones set here."""
        if self._signing_key is None:
            raise ConfigError("issuing tokens needs the JWT secret (HS*) or a private key")
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            **(extra or {}),
            "sub": user_id,
            "role": role,
            "iat": issued,
            "exp": issued + self._jwt.token_ttl_seconds,
            "jti": secrets.token_urlsafe(12),
        }
        if email:
            claims["email"] = email
        if self._jwt.issuer:
            claims["iss"] = self._jwt.issuer
        if self._jwt.audience:
            claims["aud"] = self._jwt.audience
        return jwt.encode(claims, self._signing_key, algorithm=self._algorithms[0])


def _digest(text: str) -> bytes:
    # aiohttp decodes a header's bytes that are not UTF-8 as lone surrogates: hashed as they are,
    # so such a header is an unknown token (401), not an encoding error.
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _optional_str(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= _MAX_CLAIM:
        return value
    return None


def _prepare(algorithm_name: str, key: Any, what: str) -> Any:
    """Parse a key for one algorithm and refuse it unless PyJWT would use it without complaint."""
    algorithm = get_default_algorithms().get(algorithm_name)
    if algorithm is None:
        raise ConfigError(
            f"JWT algorithm {algorithm_name} needs the 'crypto' extra: "
            "pip install 'ciris-billing-proxy[crypto]'"
        )
    try:
        prepared = algorithm.prepare_key(key)
    except Exception as exc:  # the key parsers raise several unrelated types
        raise ConfigError(f"JWT {what} cannot be used with {algorithm_name}: {type(exc).__name__}") from None
    weakness = algorithm.check_key_length(prepared)
    if weakness:
        raise ConfigError(f"JWT {what} is too short for {algorithm_name}: {weakness}")
    return prepared


def _verify_key(config: JWTConfig) -> Any:
    # Every allowed algorithm must accept the key at startup: otherwise a forged token naming an
    # allowed algorithm the key does not fit would reach PyJWT's key parser on a request.
    if config.uses_hmac:
        assert config.secret is not None  # guaranteed by JWTConfig's validator
        raw: Any = config.secret.get_secret_value().encode()
        what = "secret"
    else:
        raw, what = config.public_key or "", "public key"
    prepared = [_prepare(name, raw, what) for name in config.algorithms]
    return prepared[0]


def _signing_key(config: JWTConfig) -> Any:
    if config.private_key is None:
        return None
    return _prepare(config.algorithms[0], config.private_key.get_secret_value(), "private key")


def bearer_token(request: web.Request) -> str:
    """The raw token from `Authorization: Bearer ...`, or a 401 "Not authenticated"."""
    headers = request.headers.getall("Authorization", [])
    # Two Authorization headers are ambiguous (proxies and servers may each read a different one).
    match = _BEARER.match(headers[0].strip()) if len(headers) == 1 else None
    if match is None:
        raise http_error(401, NOT_AUTHENTICATED, {"WWW-Authenticate": "Bearer"})
    return match.group(1)


def identity_of_request(request: web.Request, verifier: TokenVerifier) -> Identity:
    """The request's identity as `verifier` sees it: verified once, then remembered on the request.

    An identity another verifier put there (an outer application's middleware, with another key)
    is not reused: the token is verified again with `verifier`, so a handler only ever sees an
    identity its own application's key vouches for.
    """
    verified: tuple[TokenVerifier, Identity] | None = request.get(VERIFIED_KEY)
    if verified is not None and verified[0] is verifier:
        return verified[1]
    return _verify_request(request, verifier)


def _verify_request(request: web.Request, verifier: TokenVerifier) -> Identity:
    headers = request.headers.getall("Authorization", [])
    try:
        # Two Authorization headers are ambiguous, as in `bearer_token`.
        identity = verifier.verify_header(headers[0]) if len(headers) == 1 else None
    except AuthError as exc:
        raise http_error(401, exc.detail, {"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
    if identity is None:
        raise http_error(401, NOT_AUTHENTICATED, {"WWW-Authenticate": "Bearer"})
    request[VERIFIED_KEY] = (verifier, identity)
    return identity


def get_identity(request: web.Request) -> Identity:
    """The verified identity of the caller, for any handler of the host app.

    The token is checked with the key of the nearest application billing is set up on (the
    handler's own, or one it is mounted in). Under the billing prefix and protected paths of that
    application the middleware has already verified it; elsewhere it is verified here, so a host
    route that calls this is protected by calling it. Raises a 401 JSON error when there is no
    valid token, and `RuntimeError("call setup_billing() first: ...")` when no application on the
    request's way has billing set up.
    """
    return identity_of_request(request, billing_service(request).verifier)


def token_check(
    verifier: TokenVerifier, public: Container[Handler] | None = None
) -> Callable[[web.Request], None]:
    """The check every protected request passes: a valid token (401 JSON otherwise). Requests
    matched to a handler in `public` (static files a `<script>` tag fetches without a token, the
    API description) pass without one; without `public`, the check is only bound to the routes
    that need it (`errors.RouteGuards`) and asks nothing of the route."""

    def check(request: web.Request) -> None:
        # Verified even when an identity is on the request already: it may be another verifier's.
        if request.method != "OPTIONS" or not is_preflight(request):
            _verify_request(request, verifier)

    if public is None:
        return check

    def check_unless_public(request: web.Request) -> None:
        if request.match_info.handler not in public:
            check(request)

    return check_unless_public


def is_preflight(request: web.Request) -> bool:
    """A CORS preflight: OPTIONS with `Origin` and `Access-Control-Request-Method`. Browsers send
    it without credentials by design and the host's CORS handling answers it, so it needs no
    token; any other OPTIONS request is an ordinary request and needs one."""
    headers = request.headers
    return request.method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


def auth_middleware(verifier: TokenVerifier, path_prefixes: tuple[str, ...] | PathScope) -> Middleware:
    """Require a valid token on the host's own paths under the given prefixes (see `error_middleware`).

    A client that goes away while the handler reads its body is the usual 400 nobody reads
    (`errors.client_gone`), not a 500, whether or not the host has `error_middleware()`. Its 401
    is returned, not raised, so a host middleware that formats `HTTPException`s leaves it as it is.
    """
    check = token_check(verifier)
    scope = as_scope(path_prefixes)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not scope.covers(request.path):
            return await handler(request)
        rid = assign_request_id(request)
        try:
            check(request)
        except HTTPJSONError as exc:
            response: web.StreamResponse = exc.reply()  # returned: a host middleware must not rewrite it
        else:
            try:
                response = await handler(request)
            except ConnectionError as exc:
                if not client_left(request, exc):
                    raise
                response = client_gone(request).reply()
        response.headers[REQUEST_ID_HEADER] = rid  # no effect on a response already sent
        return response

    return middleware
