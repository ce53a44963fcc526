"""The OpenAPI document and the routes kept in step: every route on the router is documented and
every documented operation is routed; every documented status is produced over real HTTP by a
scenario below, with a body (and headers) that validate against what the document says."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from ciris_billing_proxy import (
    AlreadyProcessed,
    AuthenticatedUser,
    Identity,
    InvalidRequest,
    ProviderUnavailable,
    TooManyRequests,
    TransactionPage,
    setup_billing,
)
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.openapi import openapi_document
from ciris_billing_proxy.products import Product, ToolBalance, ToolPurchase, ToolPurchaseRequest
from ciris_billing_proxy.providers.base import CreditProvider
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store import SQLiteDatabase
from ciris_billing_proxy.store.feed_sqlite import SQLiteChangeFeed
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.throttle import LoginAttempt
from ciris_billing_proxy.tools.cli import main

from .conftest import make_config
from .providers import MobileShopProvider
from .repo_files import doc

PREFIX = "/v1/api/billing"
DOC = f"{PREFIX}/openapi.json"
LOGIN, LOGOUT, REFRESH, ME = (f"/v1/auth/{name}" for name in ("login", "logout", "refresh", "me"))
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


async def authenticate(username: str, password: str) -> AuthenticatedUser | None:
    if username == "boom":
        raise RuntimeError("the user store is down")
    return AuthenticatedUser(username) if password == "right" else None


class Shop(MobileShopProvider):
    """A shop (app stores too) whose history fails like its other calls when told to."""

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        await self._enter("transactions")
        return await super().transactions(identity, limit, offset)


class ToolShop(Shop):
    """Sells `web_search` per use too (in memory); store packs of it are redeemed once per token,
    a token starting with "bad" is refused."""

    SEARCH = Product(name="web_search", free_uses=2, price_minor=1, packs={"web_search_10": 10})

    def __init__(self, credits: int = 0) -> None:
        super().__init__(credits)
        self.tool_uses: dict[tuple[str, str], set[str]] = {}
        self.redeemed: set[str] = set()

    @property
    def products(self) -> Mapping[str, Product]:
        return {"web_search": self.SEARCH}

    @property
    def product_purchases_enabled(self) -> bool:
        return True

    async def product_balance(self, identity: Identity, product: str) -> ToolBalance:
        await self._enter("product_balance")
        used = len(self.tool_uses.get((identity.user_id, product), set()))
        left = max(self.SEARCH.free_uses - used, 0)
        return ToolBalance(
            product_type=product,
            free_remaining=left,
            paid_credits=0,
            total_available=left,
            price_minor=1,
            total_uses=used,
        )

    async def verify_product_purchase(
        self, identity: Identity, purchase: ToolPurchaseRequest
    ) -> ToolPurchase:
        await self._enter("verify_product_purchase")
        if purchase.purchase_token.startswith("bad"):
            raise InvalidRequest("Purchase not valid: state=1")
        if purchase.purchase_token in self.redeemed:
            raise AlreadyProcessed
        self.redeemed.add(purchase.purchase_token)
        return ToolPurchase(
            success=True, product_type=purchase.tool_name, credits_added=10, new_balance=12, message="ok"
        )


class ConfusedProvider(ToolShop):
    """Declares its capabilities wrongly: a provider bug `/capabilities` answers with 503."""

    @property
    def keeps_transactions(self) -> bool:
        return "yes"  # type: ignore[return-value]


class ThrottleDatabaseDown:
    """A store-backed login throttle while its database is away (the real outage, through a cut
    connection, is tests/test_shared_login_throttle.py's)."""

    async def admit(self, attempt: LoginAttempt) -> float | None:
        raise ProviderUnavailable("database unavailable")

    async def succeeded(self, attempt: LoginAttempt) -> None:
        raise ProviderUnavailable("database unavailable")


class LostDatabase(SQLiteDatabase):
    """A ledger's database that is there at startup and gone once `lost` is set."""

    lost = False

    async def run(self, fn: Any) -> Any:
        if self.lost:
            raise ProviderUnavailable("database unavailable")
        return await super().run(fn)


class RevocationsDown(SQLiteChangeFeed):
    """A change feed whose database cannot record a revocation (the real outage, through a cut
    connection, is tests/test_freshness.py's)."""

    async def revoke(self, digest: bytes, until: float) -> None:
        raise ProviderUnavailable("database unavailable")


def routed(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route on the app and its sub-apps, as a client sees them. HEAD is
    aiohttp's automatic twin of each GET; the billing sub-app's catch-all routes answer 404/405."""
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD" or getattr(route.handler, "__name__", "") == "unmatched":
            continue
        assert route.resource is not None
        found.add((route.method, route.resource.canonical))
    return found


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


@pytest.mark.parametrize(
    ("subapp", "mount", "login_path"),
    [(True, "", "/v1/auth/login"), (False, "", "/v1/auth/login"), (True, "/agent", "/auth/v2/signin")],
)
async def test_every_route_is_documented_and_every_operation_routed(
    aiohttp_client: Any, tmp_path: Path, subapp: bool, mount: str, login_path: str
) -> None:
    app = web.Application()
    setup_billing(
        app,
        make_config(tmp_path),
        authenticate=authenticate,
        login_path=login_path,
        subapp=subapp,
        environ={},
    )
    root = app
    if mount:
        root = web.Application()
        root.add_subapp(mount, app)
    client = await aiohttp_client(root)
    resp = await client.get(mount + DOC)  # no token: the document is public
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "public, max-age=300"
    document = await resp.json()
    assert document["openapi"] == "3.1.0"
    # The auth routes answer every method (a wrong one is a JSON 405): the document says which is theirs.
    methods = {path: set(item) for path, item in document["paths"].items()}
    on_router = {
        (method, path)
        for method, path in routed(root)
        if method != "*" or len(methods.get(path, ())) == 1
        for method in ([method] if method != "*" else [m.upper() for m in methods[path]])
    }
    assert on_router == documented(document)
    assert {path for _, path in on_router} >= {mount + login_path, f"{mount}{PREFIX}/credits"}


@pytest.mark.parametrize("login_path", [None, LOGIN])
def test_the_document_is_valid_openapi_3_1(login_path: str | None) -> None:
    # The OpenAPI 3.1 schema as schemathesis ships it (the test extras pin schemathesis 4).
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    jsonschema_rs.validator_for(OPENAPI_31).validate(openapi_document(PREFIX, login_path))


async def test_without_login_or_ui_neither_is_documented(aiohttp_client: Any, tmp_path: Path) -> None:
    app = web.Application()
    setup_billing(app, make_config(tmp_path, serve_ui=False), environ={})
    document = await (await (await aiohttp_client(app)).get(DOC)).json()
    assert routed(app) == documented(document)
    assert not any(path.startswith(("/v1/auth", f"{PREFIX}/ui")) for path in document["paths"])


async def test_other_methods_are_a_json_405_listing_the_documented_one(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    app = web.Application()
    setup_billing(app, config, authenticate=authenticate, environ={})
    client = await aiohttp_client(app)
    document = openapi_document(PREFIX, LOGIN)
    headers = TokenFactory(config).headers()
    for path, item in document["paths"].items():
        allowed = {m.upper() for m in item}
        url = path.replace("{payment_id}", "pi_1").replace("{tool}", "web_search").replace("{user_id}", "ann")
        for method in set(METHODS) - allowed:
            resp = await client.request(method, url, headers=headers)
            assert resp.status == 405, (method, path)
            assert allowed <= set(resp.headers["Allow"].split(",")), (method, path)
            assert (await resp.json()) == {"detail": "Method Not Allowed"}


def test_the_command_prints_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["openapi"]) == 0
    assert json.loads(capsys.readouterr().out) == openapi_document(PREFIX, LOGIN)
    assert main(["openapi", "--prefix", "/billing/", "--no-auth-routes", "--no-ui"]) == 0
    assert json.loads(capsys.readouterr().out) == openapi_document("/billing", ui=False)
    assert main(["openapi", "--login-path", "/auth/signin"]) == 0
    assert "/auth/me" in json.loads(capsys.readouterr().out)["paths"]
    with pytest.raises(SystemExit):
        main(["openapi", "--prefix", "billing"])


# --- every documented status, produced ---------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: Any
    content_type: str = "application/json"


@dataclass
class Ctx:
    client: TestClient[web.Request, web.Application]
    provider: Shop
    tokens: TokenFactory
    auth: dict[str, str] = field(default_factory=dict)

    async def send(self, method: str, path: str, **kwargs: Any) -> Reply:
        resp = await self.client.request(method, path, **kwargs)
        raw = await resp.read()
        if resp.content_type == "application/json":
            return Reply(resp.status, CIMultiDict(resp.headers), json.loads(raw))
        return Reply(resp.status, CIMultiDict(resp.headers), raw.decode(), resp.content_type)

    async def late_body(self, path: str, headers: str = "") -> Reply:
        """Announce a body and never send it."""
        reader, writer = await asyncio.open_connection(self.client.server.host, self.client.server.port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n{headers}\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        lines = head.decode().strip().split("\r\n")
        parsed = CIMultiDict(line.split(": ", 1) for line in lines[1:])
        body = await reader.readexactly(int(parsed["Content-Length"]))
        writer.close()
        await writer.wait_closed()
        return Reply(int(lines[0].split()[1]), parsed, json.loads(body))

    def bearer(self) -> str:
        return f"Authorization: {self.auth['Authorization']}\r\n"

    def admin(self) -> dict[str, str]:
        return self.tokens.headers("root", role="admin")


Send = Callable[[Ctx], Awaitable[Reply]]
#: (operation id, status) -> (which provider, how to get that status).
SCENARIOS: dict[tuple[str, int], tuple[str, Send]] = {}


def scenario(operation_id: str, status: int, provider: str = "shop") -> Callable[[Send], Send]:
    def register(send: Send) -> Send:
        SCENARIOS[(operation_id, status)] = (provider, send)
        return send

    return register


def expect(ctx: Ctx, token: bool = True) -> dict[str, str]:
    return {**(ctx.auth if token else {}), "Expect": "bogus"}


def no_token(operation_id: str, method: str, path: str) -> None:
    scenario(operation_id, 401)(lambda ctx: ctx.send(method, path))
    scenario(operation_id, 417)(lambda ctx: ctx.send(method, path, headers=expect(ctx)))


def failing(ctx: Ctx, error: Exception) -> Ctx:
    ctx.provider.fail = error
    return ctx


for _id, _method, _path in (
    ("getCredits", "GET", f"{PREFIX}/credits"),
    ("getCapabilities", "GET", f"{PREFIX}/capabilities"),
    ("initiatePurchase", "POST", f"{PREFIX}/purchase/initiate"),
    ("getPurchaseStatus", "GET", f"{PREFIX}/purchase/status/pi_1"),
    ("getTransactions", "GET", f"{PREFIX}/transactions"),
    ("logout", "POST", LOGOUT),
    ("refresh", "POST", REFRESH),
    ("me", "GET", ME),
):
    no_token(_id, _method, _path)

scenario("getCredits", 200)(lambda ctx: ctx.send("GET", f"{PREFIX}/credits", headers=ctx.auth))
scenario("getCredits", 503)(
    lambda ctx: failing(ctx, ProviderUnavailable()).send("GET", f"{PREFIX}/credits", headers=ctx.auth)
)
scenario("getCapabilities", 200)(lambda ctx: ctx.send("GET", f"{PREFIX}/capabilities", headers=ctx.auth))
scenario("getCapabilities", 503, "confused")(
    lambda ctx: ctx.send("GET", f"{PREFIX}/capabilities", headers=ctx.auth)
)

INITIATE = f"{PREFIX}/purchase/initiate"
scenario("initiatePurchase", 200)(lambda ctx: ctx.send("POST", INITIATE, headers=ctx.auth))
scenario("initiatePurchase", 403, "simple")(lambda ctx: ctx.send("POST", INITIATE, headers=ctx.auth))
scenario("initiatePurchase", 408)(lambda ctx: ctx.late_body(INITIATE, ctx.bearer()))
scenario("initiatePurchase", 413)(
    lambda ctx: ctx.send("POST", INITIATE, headers=ctx.auth, json={"return_url": "x" * 2000})
)
scenario("initiatePurchase", 422)(
    lambda ctx: ctx.send("POST", INITIATE, headers=ctx.auth, json={"return_url": 5})
)
scenario("initiatePurchase", 503)(
    lambda ctx: failing(ctx, ProviderUnavailable()).send("POST", INITIATE, headers=ctx.auth)
)
scenario("initiatePurchase", 429)(
    lambda ctx: failing(ctx, TooManyRequests("Too many purchases started; try again later", 60)).send(
        "POST", INITIATE, headers=ctx.auth
    )
)


@scenario("initiatePurchase", 400)
async def bad_purchase_requests(ctx: Ctx) -> Reply:
    """A malformed body, a bad key, and a purchase the provider refuses."""
    malformed = await ctx.send("POST", INITIATE, headers=ctx.auth, data=b"{")
    assert malformed.status == 400
    assert malformed.body == {"detail": "Malformed JSON body"}
    bad_key = await ctx.send("POST", INITIATE, headers={**ctx.auth, "Idempotency-Key": "a b"})
    assert bad_key.status == 400
    assert bad_key.body == {"detail": "Idempotency-Key must be 1-128 letters, digits or -_.:"}
    return await failing(ctx, InvalidRequest("Email address required for purchase")).send(
        "POST", INITIATE, headers=ctx.auth
    )


@scenario("getPurchaseStatus", 200)
async def status_of_a_purchase(ctx: Ctx) -> Reply:
    started = await ctx.send("POST", INITIATE, headers={**ctx.auth, "Idempotency-Key": "click-1"})
    return await ctx.send("GET", f"{PREFIX}/purchase/status/{started.body['payment_id']}", headers=ctx.auth)


scenario("getPurchaseStatus", 403, "simple")(
    lambda ctx: ctx.send("GET", f"{PREFIX}/purchase/status/pi_1", headers=ctx.auth)
)
scenario("getPurchaseStatus", 404)(
    lambda ctx: ctx.send("GET", f"{PREFIX}/purchase/status/pi_1", headers=ctx.auth)
)
scenario("getPurchaseStatus", 503)(
    lambda ctx: failing(ctx, ProviderUnavailable()).send(
        "GET", f"{PREFIX}/purchase/status/pi_1", headers=ctx.auth
    )
)

TRANSACTIONS = f"{PREFIX}/transactions"
scenario("getTransactions", 200)(
    lambda ctx: ctx.send("GET", TRANSACTIONS, headers=ctx.auth, params={"limit": "100", "offset": "0"})
)
scenario("getTransactions", 422)(
    lambda ctx: ctx.send("GET", TRANSACTIONS, headers=ctx.auth, params={"limit": "0"})
)


scenario("getTransactions", 503)(
    lambda ctx: failing(ctx, ProviderUnavailable()).send("GET", TRANSACTIONS, headers=ctx.auth)
)


# -- the ledger's routes: "simple" is a provider on the ledger, "ledger down" its database gone ---
USAGE = f"{PREFIX}/usage"
ADMIN = f"{PREFIX}/admin"
ANN_CREDITS, ANN_GRANTS, AUDIT = f"{ADMIN}/users/ann/credits", f"{ADMIN}/users/ann/grants", f"{ADMIN}/audit"
GIFT = {"amount": 5, "reason": "goodwill", "note": "sorry about the outage"}
for _id, _method, _path in (
    ("getUsage", "GET", USAGE),
    ("getUserCredits", "GET", ANN_CREDITS),
    ("grantUserCredit", "POST", ANN_GRANTS),
    ("getCreditAudit", "GET", AUDIT),
):
    no_token(_id, _method, _path)
    scenario(_id, 503, "ledger down")(
        lambda ctx, m=_method, p=_path: ctx.send(m, p, headers=ctx.admin(), json=GIFT)
    )
    if _id != "getUsage":
        scenario(_id, 403, "simple")(
            lambda ctx, m=_method, p=_path: ctx.send(m, p, headers=ctx.auth, json=GIFT)
        )

scenario("getUsage", 200, "simple")(
    lambda ctx: ctx.send("GET", USAGE, headers=ctx.auth, params={"group_by": "model", "from": "2020-01-01"})
)
scenario("getUsage", 404)(lambda ctx: ctx.send("GET", USAGE, headers=ctx.auth))
scenario("getUsage", 422, "simple")(
    lambda ctx: ctx.send("GET", USAGE, headers=ctx.auth, params={"from": "2030-01-01", "to": "2020-01-01"})
)


@scenario("getUserCredits", 200, "simple")
async def credits_of_a_user(ctx: Ctx) -> Reply:
    assert (await ctx.send("POST", ANN_GRANTS, headers=ctx.admin(), json=GIFT)).status == 200
    return await ctx.send("GET", ANN_CREDITS, headers=ctx.admin())


scenario("getUserCredits", 404, "simple")(lambda ctx: ctx.send("GET", ANN_CREDITS, headers=ctx.admin()))
scenario("getUserCredits", 422, "simple")(
    lambda ctx: ctx.send("GET", ANN_CREDITS, headers=ctx.admin(), params={"namespace": "a b"})
)
scenario("grantUserCredit", 200, "simple")(
    lambda ctx: ctx.send("POST", ANN_GRANTS, headers={**ctx.admin(), "Idempotency-Key": "gift-1"}, json=GIFT)
)
scenario("grantUserCredit", 400, "simple")(
    lambda ctx: ctx.send("POST", ANN_GRANTS, headers=ctx.admin(), data=b"{")
)
scenario("grantUserCredit", 404)(lambda ctx: ctx.send("POST", ANN_GRANTS, headers=ctx.admin(), json=GIFT))
scenario("grantUserCredit", 408, "simple")(
    lambda ctx: ctx.late_body(ANN_GRANTS, f"Authorization: {ctx.admin()['Authorization']}\r\n")
)
scenario("grantUserCredit", 409, "simple")(
    lambda ctx: ctx.send("POST", ANN_GRANTS, headers=ctx.admin(), json={**GIFT, "amount": -50})
)
scenario("grantUserCredit", 413, "simple")(
    lambda ctx: ctx.send("POST", ANN_GRANTS, headers=ctx.admin(), json={**GIFT, "note": "x" * 2000})
)
scenario("grantUserCredit", 422, "simple")(
    lambda ctx: ctx.send("POST", ANN_GRANTS, headers=ctx.admin(), json={**GIFT, "reason": "because"})
)
scenario("getCreditAudit", 200, "simple")(
    lambda ctx: ctx.send("GET", AUDIT, headers=ctx.admin(), params={"user_id": "ann", "kind": "grant"})
)
scenario("getCreditAudit", 404)(lambda ctx: ctx.send("GET", AUDIT, headers=ctx.admin()))
scenario("getCreditAudit", 422, "simple")(
    lambda ctx: ctx.send("GET", AUDIT, headers=ctx.admin(), params={"since": "yesterday"})
)

scenario("getOpenAPI", 200)(lambda ctx: ctx.send("GET", DOC))
scenario("getOpenAPI", 417)(lambda ctx: ctx.send("GET", DOC, headers=expect(ctx, token=False)))

UI_FILE = f"{PREFIX}/ui/billing.js"
scenario("getUIFile", 200)(lambda ctx: ctx.send("GET", UI_FILE))
scenario("getUIFile", 404)(lambda ctx: ctx.send("GET", f"{PREFIX}/ui/nope.js"))
scenario("getUIFile", 417)(lambda ctx: ctx.send("GET", UI_FILE, headers=expect(ctx, token=False)))


@scenario("getUIFile", 304)
async def unchanged_file(ctx: Ctx) -> Reply:
    etag = (await ctx.send("GET", UI_FILE)).headers["ETag"]
    return await ctx.send("GET", UI_FILE, headers={"If-None-Match": etag})


GOOD_LOGIN = {"username": "alice", "password": "right"}
scenario("login", 200)(lambda ctx: ctx.send("POST", LOGIN, json=GOOD_LOGIN))
scenario("login", 400)(lambda ctx: ctx.send("POST", LOGIN))
scenario("login", 401)(lambda ctx: ctx.send("POST", LOGIN, json={"username": "alice", "password": "wrong"}))
scenario("login", 408)(lambda ctx: ctx.late_body(LOGIN))
scenario("login", 413)(lambda ctx: ctx.send("POST", LOGIN, json={**GOOD_LOGIN, "padding": "x" * 9000}))
scenario("login", 417)(lambda ctx: ctx.send("POST", LOGIN, json=GOOD_LOGIN, headers=expect(ctx, token=False)))
scenario("login", 422)(lambda ctx: ctx.send("POST", LOGIN, json={"username": 5, "password": "right"}))
scenario("login", 500)(lambda ctx: ctx.send("POST", LOGIN, json={"username": "boom", "password": "x"}))


scenario("login", 503, "throttle down")(lambda ctx: ctx.send("POST", LOGIN, json=GOOD_LOGIN))


@scenario("login", 429)
async def locked_out(ctx: Ctx) -> Reply:
    wrong = {"username": "alice", "password": "wrong"}
    assert (await ctx.send("POST", LOGIN, json=wrong)).status == 401
    return await ctx.send("POST", LOGIN, json=GOOD_LOGIN)


scenario("logout", 200)(lambda ctx: ctx.send("POST", LOGOUT, headers=ctx.auth))
scenario("logout", 400)(lambda ctx: ctx.send("POST", LOGOUT, headers=ctx.auth, data=b"nope"))
scenario("logout", 408)(lambda ctx: ctx.late_body(LOGOUT, ctx.bearer()))
scenario("logout", 413)(lambda ctx: ctx.send("POST", LOGOUT, headers=ctx.auth, json={"pad": "x" * 9000}))
scenario("logout", 422)(lambda ctx: ctx.send("POST", LOGOUT, headers=ctx.auth, json={"everywhere": "all"}))
scenario("me", 200)(lambda ctx: ctx.send("GET", ME, headers=ctx.auth))
scenario("refresh", 200)(lambda ctx: ctx.send("POST", REFRESH, headers=ctx.auth))
scenario("refresh", 400)(lambda ctx: ctx.send("POST", REFRESH, headers=ctx.auth, data=b"nope"))
scenario("refresh", 408)(lambda ctx: ctx.late_body(REFRESH, ctx.bearer()))
scenario("refresh", 413)(
    lambda ctx: ctx.send("POST", REFRESH, headers=ctx.auth, json={"refresh_token": "x" * 9000})
)
scenario("refresh", 422)(lambda ctx: ctx.send("POST", REFRESH, headers=ctx.auth, json={"refresh_token": 5}))


@scenario("refresh", 429)
async def refreshed_too_often(ctx: Ctx) -> Reply:
    headers = ctx.auth
    for _ in range(200):  # the default limit is 120 new tokens per user and hour
        reply = await ctx.send("POST", REFRESH, headers=headers)
        if reply.status != 200:
            return reply
        headers = {"Authorization": f"Bearer {reply.body['access_token']}"}
    raise AssertionError("refresh was never limited")


scenario("logout", 503, "revocations down")(lambda ctx: ctx.send("POST", LOGOUT, headers=ctx.auth))
scenario("refresh", 503, "revocations down")(lambda ctx: ctx.send("POST", REFRESH, headers=ctx.auth))

GOOGLE_PLAY, APP_STORE = f"{PREFIX}/google-play/verify", f"{PREFIX}/apple-storekit/verify"
PLAY_PURCHASE = {"purchase_token": "tok-1", "product_id": "credits_100", "package_name": "ai.ciris"}
STORE_PURCHASE = {"transaction_id": "2000000001", "product_id": "credits_100"}
for _id, _path, _body in (
    ("verifyGooglePlay", GOOGLE_PLAY, PLAY_PURCHASE),
    ("verifyAppStore", APP_STORE, STORE_PURCHASE),
):
    no_token(_id, "POST", _path)
    scenario(_id, 200)(lambda ctx, p=_path, b=_body: ctx.send("POST", p, headers=ctx.auth, json=b))
    scenario(_id, 400)(lambda ctx, p=_path: ctx.send("POST", p, headers=ctx.auth, data=b"{"))
    scenario(_id, 408)(lambda ctx, p=_path: ctx.late_body(p, ctx.bearer()))
    scenario(_id, 413)(
        lambda ctx, p=_path, b=_body: ctx.send("POST", p, headers=ctx.auth, json={**b, "pad": "x" * 2000})
    )
    scenario(_id, 422)(
        lambda ctx, p=_path, b=_body: ctx.send("POST", p, headers=ctx.auth, json={**b, "product_id": 5})
    )
    scenario(_id, 503)(
        lambda ctx, p=_path, b=_body: failing(ctx, ProviderUnavailable()).send(
            "POST", p, headers=ctx.auth, json=b
        )
    )

TOOLS = "/v1/api/tools"
TOOL_PURCHASE = {"product_id": "web_search_10", "purchase_token": "gp-tok-1", "tool_name": "web_search"}
for _id, _method, _path in (
    ("getToolBalance", "GET", f"{TOOLS}/balance/web_search"),
    ("getToolBalances", "GET", f"{TOOLS}/balance"),
    ("checkTool", "GET", f"{TOOLS}/check/web_search"),
    ("getAvailableTools", "GET", f"{TOOLS}/available"),
    ("purchaseTool", "POST", f"{TOOLS}/purchase"),
):
    no_token(_id, _method, _path)
    if _method == "GET":
        scenario(_id, 200)(lambda ctx, p=_path: ctx.send("GET", p, headers=ctx.auth))
    if _id != "getAvailableTools":
        scenario(_id, 503)(
            lambda ctx, m=_method, p=_path: failing(ctx, ProviderUnavailable()).send(
                m, p, headers=ctx.auth, json=TOOL_PURCHASE
            )
        )
for _id, _kind in (("getToolBalance", "balance"), ("checkTool", "check")):
    scenario(_id, 400)(lambda ctx, k=_kind: ctx.send("GET", f"{TOOLS}/{k}/9lives", headers=ctx.auth))
    scenario(_id, 404)(lambda ctx, k=_kind: ctx.send("GET", f"{TOOLS}/{k}/image_gen", headers=ctx.auth))
scenario("purchaseTool", 200)(
    lambda ctx: ctx.send("POST", f"{TOOLS}/purchase", headers=ctx.auth, json=TOOL_PURCHASE)
)
scenario("purchaseTool", 408)(lambda ctx: ctx.late_body(f"{TOOLS}/purchase", ctx.bearer()))
scenario("purchaseTool", 413)(
    lambda ctx: ctx.send(
        "POST", f"{TOOLS}/purchase", headers=ctx.auth, json={**TOOL_PURCHASE, "pad": "x" * 2000}
    )
)
scenario("purchaseTool", 422)(
    lambda ctx: ctx.send(
        "POST", f"{TOOLS}/purchase", headers=ctx.auth, json={**TOOL_PURCHASE, "tool_name": 5}
    )
)


@scenario("purchaseTool", 400)
async def refused_tool_purchases(ctx: Ctx) -> Reply:
    """Not JSON, a bad tool name, an unknown tool, and a purchase the store refuses."""
    path = f"{TOOLS}/purchase"
    assert (await ctx.send("POST", path, headers=ctx.auth, data=b"{")).status == 400
    bad_name = {**TOOL_PURCHASE, "tool_name": "9lives"}
    assert (await ctx.send("POST", path, headers=ctx.auth, json=bad_name)).status == 400
    return await ctx.send("POST", path, headers=ctx.auth, json={**TOOL_PURCHASE, "purchase_token": "bad-1"})


scenario("purchaseTool", 404)(
    lambda ctx: ctx.send(
        "POST", f"{TOOLS}/purchase", headers=ctx.auth, json={**TOOL_PURCHASE, "tool_name": "image_gen"}
    )
)


@scenario("purchaseTool", 409)
async def repeated_tool_purchase(ctx: Ctx) -> Reply:
    assert (await ctx.send("POST", f"{TOOLS}/purchase", headers=ctx.auth, json=TOOL_PURCHASE)).status == 200
    return await ctx.send("POST", f"{TOOLS}/purchase", headers=ctx.auth, json=TOOL_PURCHASE)


DOCUMENT = openapi_document(PREFIX, LOGIN)
OPERATIONS = {op["operationId"]: op for item in DOCUMENT["paths"].values() for op in item.values()}


def test_every_documented_status_has_a_scenario_and_every_scenario_is_documented() -> None:
    statuses = {(op_id, int(status)) for op_id, op in OPERATIONS.items() for status in op["responses"]}
    assert set(SCENARIOS) == statuses


@pytest.fixture
async def ctx(aiohttp_client: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Ctx:
    config = make_config(
        tmp_path, max_body_bytes=1024, body_timeout_seconds=0.5, login_max_failures_per_user=1
    )
    provider: CreditProvider = ConfusedProvider() if request.param == "confused" else ToolShop(credits=3)
    lost = LostDatabase(tmp_path / "ledger.sqlite3")
    if request.param == "ledger down":
        provider = SimpleProvider(database=lost)
    app = web.Application()
    setup_billing(
        app,
        config,
        provider=None if request.param == "simple" else provider,
        authenticate=authenticate,
        login_throttle=ThrottleDatabaseDown() if request.param == "throttle down" else None,
        environ={},
    )
    if request.param == "revocations down":
        app[SERVICE_KEY].feed = RevocationsDown(tmp_path / "changes.sqlite3")
    tokens = TokenFactory(config)
    client = await aiohttp_client(app)
    lost.lost = True
    return Ctx(client, provider, tokens, tokens.headers("alice"))


@pytest.mark.parametrize(
    ("operation_id", "status", "ctx"),
    [
        pytest.param(op_id, st, SCENARIOS[(op_id, st)][0], id=f"{op_id}-{st}")
        for op_id, st in sorted(SCENARIOS)
    ],
    indirect=["ctx"],
)
async def test_each_documented_status_is_produced_as_documented(
    operation_id: str, status: int, ctx: Ctx
) -> None:
    reply = await SCENARIOS[(operation_id, status)][1](ctx)
    assert reply.status == status, reply.body
    documented_reply = OPERATIONS[operation_id]["responses"][str(status)]
    if "content" not in documented_reply:
        assert reply.body == ""
        return
    schema = documented_reply["content"][reply.content_type]["schema"]
    jsonschema_rs.validator_for({**schema, "components": DOCUMENT["components"]}).validate(reply.body)
    if status >= 400:
        assert isinstance(reply.body["detail"], str)
    for name, header in documented_reply.get("headers", {}).items():
        if header.get("required"):
            assert jsonschema_rs.is_valid(header["schema"], reply.headers[name]), (name, reply.headers)


def test_the_documented_commands_print_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    section = doc("http-api.md").split("\n## OpenAPI\n", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", section, re.S)
    assert commands
    for line in commands.group(1).splitlines():
        args = shlex.split(line.split(">")[0].split("#")[0])
        assert args[0] == "ciris-billing-proxy"
        assert main(args[1:]) == 0
        assert json.loads(capsys.readouterr().out)["openapi"] == "3.1.0"


def test_every_documented_status_is_in_the_docs_errors_table() -> None:
    table = doc("http-api.md").split("\n### Errors\n", 1)[1].split("\n## ", 1)[0]
    listed = {int(status) for status in re.findall(r"^\| (\d{3})\b", table, re.M)}
    listed |= {int(status) for status in re.findall(r"^\| \d{3} / (\d{3})\b", table, re.M)}
    assert {status for _, status in SCENARIOS if status >= 400} <= listed
