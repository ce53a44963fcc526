"""`FakeBillingBackend`: the CIRIS Billing HTTP contract as a real aiohttp server on loopback.

Start it in the running loop (`await fake.start()`) or on its own thread (`with fake.run_in_thread():`),
point the `ciris` provider at `fake.url` with `fake.api_key`, and drive it from the test:
`confirm_payment`, `inject`, `calls`, `received`. Control endpoints under `/_fake/` do the same over
HTTP, for a person trying the paid flow with `ciris-billing-proxy serve --fake-backend`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ...providers.ciris.backend import HEALTH_PROBE_PATH
from .faults import Fault, FaultPlan
from .ledger import BackendError, Ledger, Pricing
from .schemas import (
    AccountRequest,
    AppStoreVerifyBody,
    BackendPurchaseBody,
    ChargeRequest,
    CheckRequest,
    CreditRequest,
    GooglePlayVerifyBody,
    InvalidBody,
    ToolChargeBody,
    ToolPurchaseBody,
    _Body,
    parse,
)
from .tools import ToolBook

READ = "billing:read"
WRITE = "billing:write"
#: Headers never kept in `received`: the API key (and any bearer token) stay out of test output.
SECRET_HEADERS = frozenset({"x-api-key", "authorization"})

#: Route name -> the endpoint label used by `inject(endpoint=...)` and `calls`.
ENDPOINTS = {
    "credits_check": "credits/check",
    "purchase_status_alias": "purchase_status",
    "accounts_upsert": "accounts",
    "google_play_verify": "google-play/verify",
    "apple_storekit_verify": "apple-storekit/verify",
    "tools_balance_one": "tools/balance",
    "tools_balance_all": "tools/balance",
    "tools_check": "tools/check",
    "tools_charge": "tools/charge",
    "tools_purchase": "tools/purchase/verify",
}
#: Bearer ID tokens the fake accepts: `fake-id-token.google.<sub>` or `fake-id-token.apple.<sub>`,
#: for the identity `oauth:google`/`oauth:apple` + `<sub>`; the sub `expired` is an expired token.
FAKE_ID_PREFIX = "fake-id-token."


def fake_id_token(issuer: str, subject: str) -> str:
    """An ID token the fake backend accepts as `oauth:{issuer}` / `subject` (`google` or `apple`)."""
    return f"{FAKE_ID_PREFIX}{issuer}.{subject}"


def _bearer_identity(authorization: str) -> tuple[str, str] | BackendError:
    """The identity of a Bearer ID token (section 1, JWT path), or the backend's 401."""
    token = authorization.removeprefix("Bearer ").strip()
    issuer, _, subject = token.removeprefix(FAKE_ID_PREFIX).partition(".")
    if not token.startswith(FAKE_ID_PREFIX) or issuer not in ("google", "apple") or not subject:
        return BackendError(401, "Invalid Google ID token: not a fake-id-token")
    if subject == "expired":
        return BackendError(
            401,
            {"error": "token_expired", "message": "Your session has expired. Please sign in again."},
        )
    return f"oauth:{issuer}", subject


def new_api_key(env: str = "test") -> str:
    """A key shaped like the real ones: `cbk_{env}_` + 43 base64url characters."""
    return f"cbk_{env}_{secrets.token_urlsafe(32)}"


def key_missing_but_bearer(request: web.Request) -> bool:
    """If both are sent, `X-API-Key` wins (section 1)."""
    return "X-API-Key" not in request.headers and request.headers.get("Authorization", "").startswith(
        "Bearer "
    )


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body), status=status, content_type="application/json", headers=headers
    )


class FakeBillingBackend:
    """`received` keeps the last `max_received` requests (1,000 by default), oldest dropped first,
    each as `(endpoint, JSON body or None, headers)` without the `X-API-Key` and `Authorization`
    headers: a long-running fake (`serve --fake-backend`) stays bounded and never holds the key."""

    def __init__(
        self, *, api_key: str | None = None, pricing: Pricing | None = None, max_received: int = 1000
    ) -> None:
        self.api_key = api_key or new_api_key()
        self.api_keys: dict[str, set[str]] = {self.api_key: {READ, WRITE}}
        self._initial_pricing = pricing or Pricing()
        self.ledger = Ledger(replace(self._initial_pricing))
        self.pricing = self.ledger.pricing
        self.tools = ToolBook(self.ledger)
        self.faults = FaultPlan()
        self.calls: Counter[str] = Counter()
        self.received: deque[tuple[str, dict[str, Any] | None, dict[str, str]]] = deque(maxlen=max_received)
        #: When true, a repeated charge key answers 201 with the first charge (the race path).
        self.duplicate_charges_as_201 = False
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handling: set[asyncio.Task[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._loop = asyncio.get_running_loop()
        # Like the real service (FastAPI), a request whose client went away still runs to the end:
        # a charge may land after its caller timed out. Stragglers are not waited for at shutdown.
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.url = f"http://{bound[0]}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        server = runner.server
        await runner.cleanup()
        # Requests still running (an injected latency; nothing cancels them on disconnect) end here.
        pending = [task for task in self._handling if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        # A request still being served (an injected latency), or a connection accepted while
        # shutting down, can outlive the shutdown; cut them so no socket is left open when the
        # loop goes away.
        for _ in range(50):
            held = server.connections if server is not None else []
            if not held:
                break
            for protocol in held:
                if protocol.transport is not None:
                    protocol.transport.abort()
            await asyncio.sleep(0.01)

    @contextmanager
    def run_in_thread(self) -> Iterator[FakeBillingBackend]:
        """Serve from a thread with its own event loop; works beside any test framework."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        thread = threading.Thread(target=loop.run_forever, name="fake-billing-backend", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(30)
            started.set()
            yield self
        finally:
            if started.is_set():
                asyncio.run_coroutine_threadsafe(self._stop_and_settle(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()

    async def _stop_and_settle(self) -> None:
        await self.stop()
        # Closed transports release their sockets on later loop iterations; let them, or the
        # sockets would be garbage-collected unclosed once this loop stops (a ResourceWarning).
        await asyncio.sleep(0.01)

    # -- test controls --------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (accounts, payments, faults, counters, extra keys, pricing changes), as
        if new: pricing goes back to what the constructor was given."""
        self.ledger = Ledger(replace(self._initial_pricing))
        self.pricing = self.ledger.pricing
        self.tools = ToolBook(self.ledger)
        self.api_keys = {self.api_key: {READ, WRITE}}
        self.faults.clear()
        self.calls.clear()
        self.received.clear()
        self.duplicate_charges_as_201 = False

    def confirm_payment(self, payment_id: str, *, webhook_delay: float | None = 0.0) -> None:
        """Stripe says `succeeded`; the webhook credits the purchase after `webhook_delay` seconds
        (at once for 0, never for None: call `deliver_webhook` yourself)."""
        self.ledger.set_payment_status(payment_id, "succeeded")
        if webhook_delay == 0:
            self.ledger.deliver_webhook(payment_id)
        elif webhook_delay is not None:
            loop = self._loop
            assert loop is not None, "the fake backend is not running"
            loop.call_soon_threadsafe(loop.call_later, webhook_delay, self.ledger.deliver_webhook, payment_id)

    def fail_payment(self, payment_id: str, status: str = "requires_payment_method") -> None:
        """A declined card returns a PaymentIntent to `requires_payment_method`."""
        self.ledger.set_payment_status(payment_id, status)

    def cancel_payment(self, payment_id: str) -> None:
        self.ledger.set_payment_status(payment_id, "canceled")

    def deliver_webhook(self, payment_id: str) -> bool:
        return self.ledger.deliver_webhook(payment_id)

    def inject(
        self, kind: str, *, endpoint: str | None = None, times: int | None = None, seconds: float = 0.0
    ) -> None:
        """Add a fault (see `faults.FaultKind`) for `endpoint` (all when None), `times` calls (or
        until `clear_faults`). Endpoints: credits/check, charges, credits, accounts, purchases,
        purchase_status, transactions, google-play/verify, apple-storekit/verify, tools/balance,
        tools/check, tools/charge, tools/purchase/verify."""
        self.faults.add(Fault(kind, endpoint, times, seconds))

    def clear_faults(self) -> None:
        self.faults.clear()

    def add_api_key(self, permissions: set[str] | None = None) -> str:
        key = new_api_key()
        self.api_keys[key] = {READ, WRITE} if permissions is None else set(permissions)
        return key

    def revoke_api_key(self, key: str) -> None:
        self.api_keys.pop(key, None)

    def account(self, oauth_provider: str, external_id: str) -> dict[str, Any]:
        """The credit view of an existing account (without the side effects of a check)."""
        with self.ledger.lock:
            return self.ledger.credit_view(self.ledger.accounts[(oauth_provider, external_id)])

    def set_account_status(self, oauth_provider: str, external_id: str, status: str) -> None:
        with self.ledger.lock:
            self.ledger.accounts[(oauth_provider, external_id)].status = status

    def grant(self, oauth_provider: str, external_id: str, credits: int) -> None:
        """Add paid credits as an operator's grant would: a `grant` credit in the account's listing."""
        with self.ledger.lock:
            self.ledger.grant(self.ledger.accounts[(oauth_provider, external_id)], credits)

    def use_up_free_uses(self, oauth_provider: str, external_id: str) -> None:
        with self.ledger.lock:
            account = self.ledger.accounts[(oauth_provider, external_id)]
            account.free_uses_remaining = account.daily_free_uses_remaining = 0

    # -- HTTP -----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._instrument])
        r = app.router
        r.add_post("/v1/billing/credits/check", self._check, name="credits_check")
        r.add_post("/v1/billing/charges", self._charge, name="charges")
        r.add_post("/v1/billing/credits", self._add_credits, name="credits")
        r.add_post("/v1/billing/accounts", self._upsert_account, name="accounts_upsert")
        # The proxy's readiness probes, unnamed: answered (the key checked) but neither counted,
        # recorded nor faulted, so a test sees only the calls of the flows it drives.
        r.add_get(HEALTH_PROBE_PATH, self._health_probe)
        r.add_get("/health", self._health)
        r.add_get("/v1/billing/accounts/{oauth_provider}/{external_id}", self._get_account, name="accounts")
        r.add_post("/v1/billing/purchases", self._purchase, name="purchases")
        r.add_get("/v1/billing/purchases/{payment_id}", self._payment, name="purchase_status")
        r.add_get("/v1/billing/purchases/{payment_id}/status", self._payment, name="purchase_status_alias")
        r.add_get("/v1/billing/transactions", self._transactions, name="transactions")
        r.add_post("/v1/billing/google-play/verify", self._google_play, name="google_play_verify")
        r.add_post("/v1/billing/apple-storekit/verify", self._app_store, name="apple_storekit_verify")
        r.add_get("/v1/tools/balance/{product_type}", self._tool_balance, name="tools_balance_one")
        r.add_get("/v1/tools/balance", self._tool_balances, name="tools_balance_all")
        r.add_get("/v1/tools/check/{product_type}", self._tool_check, name="tools_check")
        r.add_post("/v1/tools/charge", self._tool_charge, name="tools_charge")
        r.add_post("/v1/tools/purchase/verify", self._tool_purchase, name="tools_purchase")
        r.add_post("/_fake/payments/{payment_id}/{action}", self._control_payment)
        r.add_get("/_fake/calls", self._control_calls)
        return app

    @web.middleware
    async def _instrument(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name
        if route is None:  # control endpoints and unknown paths: neither counted nor faulted
            try:
                return await handler(request)
            except web.HTTPNotFound:
                return _json(404, {"detail": "Not Found"})
            except web.HTTPMethodNotAllowed:
                return _json(405, {"detail": "Method Not Allowed"})
        endpoint = ENDPOINTS.get(route, route)
        self.calls[endpoint] += 1
        task = asyncio.current_task()
        if task is not None:
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)
        body = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS}
        self.received.append((endpoint, body, headers))
        delay_after = 0.0
        for fault in self.faults.take(endpoint):
            if fault.kind == "latency":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "latency_after":
                delay_after += fault.seconds
            else:
                return self._fault_reply(request, fault, endpoint)
        try:
            response = await handler(request)
        except BackendError as exc:
            response = _json(exc.status, {"detail": exc.detail}, exc.headers)
        if delay_after:
            await asyncio.sleep(delay_after)
        return response

    def _fault_reply(self, request: web.Request, fault: Fault, endpoint: str) -> web.Response:
        if fault.kind == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise web.HTTPInternalServerError  # never written: the connection is gone
        if fault.kind == "error_500":
            return web.Response(status=500, text="Internal Server Error", content_type="text/plain")
        if fault.kind == "error_502":
            return web.Response(status=502, text="<html>502 Bad Gateway</html>", content_type="text/html")
        if fault.kind == "rate_limit_503":
            html = "<html><head><title>503 Service Temporarily Unavailable</title></head></html>"
            return web.Response(status=503, text=html, content_type="text/html")
        if fault.kind == "rate_limit_429":
            return _json(429, {"detail": "Rate limit exceeded"})
        if fault.kind == "bad_json":
            return web.Response(status=200, text='{"has_credit": tru', content_type="application/json")
        if fault.kind == "reject_key":
            return _json(
                401, {"detail": "Authentication failed: Invalid API key"}, {"WWW-Authenticate": "ApiKey"}
            )
        if fault.kind == "bad_request":
            return _json(400, {"detail": "Invalid request"})
        if fault.kind == "stripe_unavailable":
            return _json(503, {"detail": "Payment provider unavailable"})
        if fault.kind == "cloudflare_403":
            return web.Response(
                status=403,
                text="Direct access forbidden. Use billing.ciris.ai via Cloudflare.",
                content_type="text/plain",
            )
        payment_id = request.match_info.get("payment_id", "")
        return _json(404, {"detail": f"Payment not found: {payment_id}"})

    def _key_error(self, request: web.Request, permission: str, *, either: bool) -> BackendError | None:
        """The auth dependency: `either` is the API-key-or-JWT style of credits/check (section 1)."""
        key = request.headers.get("X-API-Key")
        if key is None:
            if either:
                if request.headers.get("Authorization", "").startswith("Bearer "):
                    who = _bearer_identity(request.headers["Authorization"])
                    return who if isinstance(who, BackendError) else None
                return BackendError(
                    401,
                    "Authentication required. Provide X-API-Key header or "
                    "Authorization: Bearer {oauth_id_token}",
                    {"WWW-Authenticate": "Bearer, ApiKey"},
                )
            return None  # reported as a 422 together with body errors
        if not key.startswith("cbk_"):
            reason = "Authentication failed: Invalid API key format"
        elif key not in self.api_keys:
            reason = "Authentication failed: Invalid API key"
        elif permission not in self.api_keys[key]:
            return BackendError(403, f"Missing required permission: {permission}")
        else:
            return None
        if either:
            return BackendError(401, f"Invalid API key: {reason}")
        return BackendError(401, reason, {"WWW-Authenticate": "ApiKey"})

    async def _authorized_body(
        self, request: web.Request, model: type[_Body] | None, permission: str, *, either: bool = False
    ) -> dict[str, Any]:
        error = self._key_error(request, permission, either=either)
        if error is not None:
            raise error
        missing_key = not either and "X-API-Key" not in request.headers
        errors: list[dict[str, Any]] = []
        if missing_key:
            errors.append(
                {"type": "missing", "loc": ["header", "x-api-key"], "msg": "Field required", "input": None}
            )
        body: dict[str, Any] = {}
        if model is not None:
            try:
                body = parse(model, await request.read())
            except InvalidBody as exc:
                errors.extend(exc.errors)
        if errors:
            raise BackendError(422, errors)
        if either and key_missing_but_bearer(request):
            # The body's identity is required but ignored: the token says who the user is.
            who = _bearer_identity(request.headers["Authorization"])
            assert not isinstance(who, BackendError)  # checked above
            body["oauth_provider"], body["external_id"] = who
        return body

    async def _check(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, CheckRequest, READ, either=True)
        return _json(200, self.ledger.check(body))

    async def _google_play(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, GooglePlayVerifyBody, WRITE, either=True)
        return _json(200, self.ledger.verify_store("google-play", body["purchase_token"], body))

    async def _app_store(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, AppStoreVerifyBody, WRITE, either=True)
        return _json(200, self.ledger.verify_store("apple-storekit", body["transaction_id"], body))

    async def _charge(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, ChargeRequest, WRITE)
        return _json(201, self.ledger.charge(body, duplicate_as_201=self.duplicate_charges_as_201))

    async def _add_credits(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, CreditRequest, WRITE)
        return _json(201, self.ledger.add_credits(body))

    async def _upsert_account(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, AccountRequest, WRITE)
        return _json(201, self.ledger.upsert_account(body))

    async def _get_account(self, request: web.Request) -> web.Response:
        await self._authorized_body(request, None, READ)
        key = (request.match_info["oauth_provider"], request.match_info["external_id"])
        return _json(200, self.ledger.account_view(key))

    async def _purchase(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, BackendPurchaseBody, WRITE)
        return _json(201, self.ledger.purchase(body))

    async def _payment(self, request: web.Request) -> web.Response:
        await self._authorized_body(request, None, READ)
        return _json(200, self.ledger.payment(request.match_info["payment_id"]))

    async def _transactions(self, request: web.Request) -> web.Response:
        await self._authorized_body(request, None, READ)
        query = request.query
        try:
            limit = int(query.get("limit", "50"))
            offset = int(query.get("offset", "0"))
            key = (query["oauth_provider"], query["external_id"])
        except (KeyError, ValueError):
            raise BackendError(
                422, [{"type": "missing", "loc": ["query"], "msg": "Field required", "input": None}]
            ) from None
        return _json(200, self.ledger.list_transactions(key, limit, offset))

    async def _health_probe(self, request: web.Request) -> web.Response:
        try:
            await self._authorized_body(request, None, READ)
        except BackendError as exc:
            return _json(exc.status, {"detail": exc.detail}, exc.headers)
        return _json(404, {"detail": "Account not found"})

    # -- tool credits (3.9): reads with the user's Bearer ID token; with an API key (a guess: the
    # public source authenticates them as `get_validated_identity`) the identity is in the query.
    def _tool_reader(self, request: web.Request) -> tuple[str, str]:
        if key_missing_but_bearer(request):
            who = _bearer_identity(request.headers["Authorization"])
            if isinstance(who, BackendError):
                raise who
            return who
        error = self._key_error(request, READ, either=True)
        if error is not None:
            raise error
        try:
            return request.query["oauth_provider"], request.query["external_id"]
        except KeyError:
            raise BackendError(
                422, [{"type": "missing", "loc": ["query"], "msg": "Field required", "input": None}]
            ) from None

    async def _tool_balance(self, request: web.Request) -> web.Response:
        who = self._tool_reader(request)
        return _json(200, self.tools.balance(who, request.match_info["product_type"]))

    async def _tool_balances(self, request: web.Request) -> web.Response:
        return _json(200, self.tools.balances(self._tool_reader(request)))

    async def _tool_check(self, request: web.Request) -> web.Response:
        who = self._tool_reader(request)
        return _json(200, self.tools.check(who, request.match_info["product_type"]))

    async def _tool_charge(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, ToolChargeBody, WRITE)
        return _json(200, self.tools.charge(body))

    async def _tool_purchase(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request, ToolPurchaseBody, WRITE, either=True)
        if body.get("oauth_provider") is None or body.get("external_id") is None:
            raise BackendError(
                422,
                [{"type": "missing", "loc": ["body", "external_id"], "msg": "Field required", "input": None}],
            )
        return _json(200, self.tools.verify_purchase((body["oauth_provider"], body["external_id"]), body))

    def tool_inventory(self, oauth_provider: str, external_id: str, product: str) -> dict[str, Any]:
        """A product's balance of an account (as `GET /v1/tools/balance/{product}` answers it)."""
        return self.tools.balance((oauth_provider, external_id), product)

    def grant_tool_credits(self, oauth_provider: str, external_id: str, product: str, credits: int) -> None:
        """Add paid credits of a product to an account, as a redeemed pack would."""
        with self.ledger.lock:
            self.tools._inventory((oauth_provider, external_id), product).paid_credits += credits

    async def _health(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "healthy", "database": "connected", "timestamp": "now"})

    async def _control_payment(self, request: web.Request) -> web.Response:
        payment_id, action = request.match_info["payment_id"], request.match_info["action"]
        if payment_id not in self.ledger.payments:
            return _json(404, {"detail": f"Unknown payment {payment_id}"})
        if action == "confirm":
            try:
                delay = float(request.query.get("webhook_delay", "0"))
            except ValueError:
                return _json(400, {"detail": "webhook_delay must be a number of seconds"})
            self.confirm_payment(payment_id, webhook_delay=delay)
        elif action == "fail":
            self.fail_payment(payment_id)
        elif action == "cancel":
            self.cancel_payment(payment_id)
        else:
            return _json(404, {"detail": "actions: confirm, fail, cancel"})
        return _json(200, self.ledger.payment(payment_id) | {"client_secret": "(hidden)"})

    async def _control_calls(self, request: web.Request) -> web.Response:
        return _json(200, dict(self.calls))
