"""`FakeStripeAPI`: the part of Stripe's API a seller of credit packs uses, as a real aiohttp server on
loopback that the official `stripe` library talks to through its API base.

    fake = FakeStripeAPI()
    base = await fake.start()
    client = stripe.StripeClient(fake.secret_key, base_addresses={"api": base},
                                 http_client=stripe.AIOHTTPClient())
    fake.webhooks.url = agent_url + "/v1/api/billing/stripe/webhook"   # signed with fake.webhook_secret

Served: `POST /v1/payment_intents` (with `Idempotency-Key` replays), `GET /v1/payment_intents/{id}`,
`POST /v1/payment_intents/{id}/confirm` and `/cancel`, `POST /v1/refunds`, `GET /v1/events/{id}`,
`GET /v1/events`. The secret key is checked on each (`Authorization: Bearer sk_...`). A test drives
the rest directly (`state.confirm`, `state.refund`, `state.dispute`, `webhooks`, `fail_requests`), and a
person trying `serve --provider stripe --fake-stripe` over HTTP: `POST /_fake/payment_intents/{id}/
(confirm|cancel|refund|dispute)` with an optional `payment_method` or `amount` form field.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiDictProxy

from .state import Charge, Intent, StripeError, StripeState, missing
from .webhooks import WebhookSender

MAX_BODY: Final = 64 * 1024


def _error(exc: StripeError) -> web.Response:
    return web.json_response({"error": exc.body}, status=exc.status)


def _form(data: MultiDictProxy[Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Stripe's form encoding: plain fields, and `metadata[key]` fields as one mapping."""
    fields: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(value, str):
            continue
        if key.startswith("metadata[") and key.endswith("]"):
            metadata[key[len("metadata[") : -1]] = value
        else:
            fields[key] = value
    return fields, metadata


def _int(fields: Mapping[str, str], name: str) -> int | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise StripeError(
            400, "invalid_request_error", f"Invalid integer: {raw}", "parameter_invalid_integer"
        ) from None


def _page(found: list[dict[str, Any]], request: web.Request, url: str) -> web.Response:
    """A list, newest first, of at most `limit` (Stripe's default 10, at most 100)."""
    limit = min(_int(request.query, "limit") or 10, 100)
    return web.json_response(
        {"object": "list", "url": url, "has_more": len(found) > limit, "data": found[:limit]}
    )


class FakeStripeAPI:
    def __init__(
        self,
        *,
        secret_key: str | None = None,
        publishable_key: str | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        self.secret_key = secret_key or f"sk_test_fake_{secrets.token_hex(12)}"
        self.publishable_key = publishable_key or f"pk_test_fake_{secrets.token_hex(12)}"
        self.webhook_secret = webhook_secret or f"whsec_fake_{secrets.token_hex(16)}"
        self.state = StripeState()
        self.webhooks = WebhookSender(self.webhook_secret)
        self.state.listeners.append(self.webhooks)
        #: The API calls answered, as (method, route), oldest first.
        self.calls: list[tuple[str, str]] = []
        #: (POST path, Idempotency-Key) -> (the parameters, the reply): Stripe's 24-hour replays.
        self._replies: dict[tuple[str, str], tuple[dict[str, str], web.Response]] = {}
        self._failing: list[tuple[int, float, str | None, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def api_base(self) -> str:
        return self.url

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        route = app.router
        route.add_post("/v1/payment_intents", self._create_intent)
        route.add_get("/v1/payment_intents", self._list_intents)
        route.add_get("/v1/payment_intents/{id}", self._get_intent)
        route.add_post("/v1/payment_intents/{id}/confirm", self._confirm_intent)
        route.add_post("/v1/payment_intents/{id}/cancel", self._cancel_intent)
        route.add_post("/v1/refunds", self._create_refund)
        route.add_get("/v1/events/{id}", self._get_event)
        route.add_get("/v1/events", self._list_events)
        route.add_post("/_fake/payment_intents/{id}/{action}", self._control)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on loopback (a free port by default); returns the API base URL."""
        await self.webhooks.start()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.url = f"http://{bound[0]}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        await self.webhooks.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def fail_requests(
        self,
        times: int,
        status: int = 500,
        delay: float = 0.0,
        *,
        method: str | None = None,
        path: str = "/v1/",
    ) -> None:
        """The next `times` API calls (of `method`, to paths starting with `path`) wait `delay`
        seconds, then answer `status` (0: the connection is dropped without a reply) and change
        nothing."""
        self._failing.extend([(status, delay, method, path)] * times)

    # -- what Stripe.js does in the browser (the fake Stripe.js calls it through the agent) -------
    def confirm_card(self, client_secret: str, number: str) -> Intent:
        return self.state.confirm_card(client_secret, number)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/_fake/"):
            fault = self._fault(request)
            if fault is not None:
                status, delay = fault
                if delay:
                    await asyncio.sleep(delay)
                if status == 0:
                    assert request.transport is not None
                    request.transport.close()
                    return web.Response()  # written nowhere: the client sees the connection end
                return _error(StripeError(status, "api_error", "An unknown error occurred (fake fault)."))
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), self.secret_key.encode()):
                return _error(
                    StripeError(401, "invalid_request_error", "Invalid API Key provided.", "api_key_invalid")
                )
        route = request.match_info.route.resource
        self.calls.append((request.method, route.canonical if route is not None else request.path))
        try:
            return await handler(request)
        except StripeError as exc:
            return _error(exc)

    def _fault(self, request: web.Request) -> tuple[int, float] | None:
        for n, (status, delay, method, path) in enumerate(self._failing):
            if method in (None, request.method) and request.path.startswith(path):
                del self._failing[n]
                return status, delay
        return None

    async def _once(
        self, request: web.Request, make: Callable[[dict[str, str], dict[str, str]], Any]
    ) -> web.Response:
        """A POST, replayed for a repeated `Idempotency-Key` with the same parameters (Stripe keeps
        keys 24 hours; a key reused with other parameters is an `idempotency_error`)."""
        fields, metadata = _form(await request.post())
        key = request.headers.get("Idempotency-Key")
        params = {**fields, **{f"metadata[{k}]": v for k, v in metadata.items()}}
        if key is not None:
            kept = self._replies.get((request.path, key))
            if kept is not None:
                if kept[0] != params:
                    raise StripeError(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same parameters they "
                        "were first used with.",
                    )
                reply = kept[1]
                return web.Response(
                    body=reply.body,
                    status=reply.status,
                    content_type="application/json",
                    headers={"Idempotent-Replayed": "true"},
                )
        try:
            reply = web.json_response(make(fields, metadata))
        except StripeError as exc:
            reply = _error(exc)
        if key is not None:
            self._replies[(request.path, key)] = (params, reply)
        return reply

    async def _create_intent(self, request: web.Request) -> web.Response:
        def create(fields: dict[str, str], metadata: dict[str, str]) -> dict[str, Any]:
            amount, currency = _int(fields, "amount"), fields.get("currency")
            if amount is None or not currency:
                raise StripeError(
                    400, "invalid_request_error", "Missing required param: amount.", "parameter_missing"
                )
            intent = self.state.create_intent(
                amount, currency, metadata, fields.get("description"), fields.get("receipt_email")
            )
            if fields.get("confirm") == "true":
                intent = self.state.confirm(intent.id, fields.get("payment_method"))
            return intent.view()

        return await self._once(request, create)

    async def _get_intent(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.intent(request.match_info["id"]).view())

    async def _list_intents(self, request: web.Request) -> web.Response:
        found = [intent.view() for intent in reversed(self.state.intents.values())]
        return _page(found, request, "/v1/payment_intents")

    async def _confirm_intent(self, request: web.Request) -> web.Response:
        intent_id = request.match_info["id"]
        return await self._once(
            request, lambda f, _m: self.state.confirm(intent_id, f.get("payment_method")).view()
        )

    async def _cancel_intent(self, request: web.Request) -> web.Response:
        intent_id = request.match_info["id"]
        return await self._once(
            request, lambda f, _m: self.state.cancel(intent_id, f.get("cancellation_reason")).view()
        )

    async def _create_refund(self, request: web.Request) -> web.Response:
        def refund(fields: dict[str, str], _metadata: dict[str, str]) -> dict[str, Any]:
            charge: Charge = self.state.charge_of(fields.get("payment_intent"), fields.get("charge"))
            return self.state.refund(charge, _int(fields, "amount"))

        return await self._once(request, refund)

    async def _get_event(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.event(request.match_info["id"]).view())

    async def _list_events(self, request: web.Request) -> web.Response:
        kind = request.query.get("type")
        found = [e.view() for e in reversed(self.state.events) if kind in (None, e.type)]
        return _page(found, request, "/v1/events")

    async def _control(self, request: web.Request) -> web.Response:
        """The test controls over HTTP, for a person at a shell: pay, cancel, refund or dispute."""
        intent_id, action = request.match_info["id"], request.match_info["action"]
        fields, _ = _form(await request.post())
        state = self.state
        if action == "confirm":
            return web.json_response(
                state.confirm(intent_id, fields.get("payment_method", "pm_card_visa")).view()
            )
        if action == "cancel":
            return web.json_response(state.cancel(intent_id).view())
        if action == "refund":
            return web.json_response(state.refund(state.charge_of(intent_id, None), _int(fields, "amount")))
        if action == "dispute":
            return web.json_response(state.dispute(state.charge_of(intent_id, None).id))
        raise missing("action", action)
