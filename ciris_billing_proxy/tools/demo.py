"""The demo agent: login, the billing and tool routes, and its gated endpoints: `POST /v1/agent/interact`
(one interaction use; on a provider with weighted spends, an optional cost, 1-10, in `?cost=N` or
the body's `"cost"`: a demo-only knob) and `POST /v1/agent/tools/{product}` (one use of that product).

It is what `ciris-billing-proxy serve` runs; `examples/agent.py` is the same idea in a few lines.
State lives in the data directory: the usage ledger, a generated JWT secret (so tokens stay valid
across restarts) and the generated demo user's password hash.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from ..auth import identity_of_request
from ..bodies import expect_continue, read_model
from ..config import BillingConfig, ConfigError
from ..cors import allow_preflights, cors_middleware
from ..errors import CATCH_ALLS, error_middleware, guarded, http_error, unguarded, unmatched_reply
from ..gate import credit_gate
from ..keys import GATED_SPEND_KEY, SPENT_STATUS_KEY, billing_service
from ..models import InteractReply, InteractRequest
from ..operations import IntQuery
from ..ops.health import ALIVE_PATH, READY_PATH, alive, ready
from ..ops.metrics import METRICS_PATH, metrics
from ..products import valid_tool_name
from ..routes import json_reply
from ..setup import setup_billing
from ..tool_routes import INVALID_NAME
from ..ui.demo_page import add_demo_page, demo_page
from .users import UserStore

if TYPE_CHECKING:
    from ..testing.fake_backend import FakeBillingBackend
    from ..testing.fake_stripe_api import FakeStripeAPI

SECRET_FILE = "jwt-secret"  # noqa: S105 - a file name
USERS_FILE = "demo-users.json"
#: The demo's gated endpoints.
INTERACT_PATH = "/v1/agent/interact"
TOOL_PATH = "/v1/agent/tools/{product}"
#: What the `simple` provider sells per use in the demo unless `CIRIS_SIMPLE_PRODUCTS` (or the
#: `products` option) says otherwise.
DEMO_PRODUCTS = {
    "web_search": {"free_uses": 10, "price_minor": 0, "description": "Search the web for current information"}
}
# Letters and digits only: a password starting with "-" reads as an option on a command line.
_PASSWORD_ALPHABET = string.ascii_letters + string.digits


#: Demo only: what an interaction costs (docs/credits.md), 1-10: `?cost=N`, or `"cost"` in the
#: body. A real agent decides a cost from what the interaction did, never from what the client asks.
COST_PARAM: Final = IntQuery("cost", 1, 1, 10, "Demo only: what this interaction costs (weighted spends).")
#: What a `cost` other than 1 gets from a provider that takes one use per interaction.
ONE_USE_ONLY: Final = "Invalid request: cost: this agent's credit provider takes one use per interaction"
#: A body's `cost` that is not what was charged: a streamed body arrives after the gate took its use.
COST_IN_STREAM: Final = (
    "Invalid request: cost: a body sent in chunks is read after the use is taken; send its cost as ?cost=N"
)
#: The body, when the cost was read from it before the gate's spend (a body is read once).
_BODY: Final = web.RequestKey("ciris_billing_demo_interaction", InteractRequest)


async def interaction_cost(request: web.Request) -> int:
    """The demo's cost of an interaction: `?cost=N` (1-10; a 422 otherwise); else the body's `cost`
    when the body comes whole (a `Content-Length`), read before the spend; else 1. A body streamed
    in chunks is not waited for: the use is taken first, as a gate takes every use, and the handler
    refuses a `cost` in it that differs from what was taken."""
    if COST_PARAM.name in request.query:
        return COST_PARAM.read(request)
    if request.content_length is None:
        return 1
    body = request[_BODY] = await _read_interaction(request)
    return body.cost


async def _read_interaction(request: web.Request) -> InteractRequest:
    config = billing_service(request).config
    # A string and a whole number: validated alike from JSON and from Python (`read_model`).
    return await read_model(
        request,
        InteractRequest,
        config.max_body_bytes,
        time_limit=config.body_timeout_seconds,
        json_mode=True,
    )


async def _interact(request: web.Request) -> web.Response:
    service = billing_service(request)
    body = request.get(_BODY) or await _read_interaction(request)
    if COST_PARAM.name in request.query:
        cost = COST_PARAM.read(request)
        if "cost" in body.model_fields_set and body.cost != cost:
            raise http_error(422, "Invalid request: cost: ?cost and the body's cost differ")
    else:
        cost = body.cost
    if cost != 1 and not service.provider.weighted_spends:
        raise http_error(422, ONE_USE_ONLY)
    gated = request.get(GATED_SPEND_KEY)
    if gated is not None and gated.amount != cost:
        raise http_error(422, COST_IN_STREAM)
    identity = identity_of_request(request, service.verifier)  # as the gate verified it
    # What the gate's spend left, straight from its transaction; read only if the provider did not say.
    status = request.get(SPENT_STATUS_KEY)
    if status is None:
        status = await service.credit_status(identity)
    return json_reply(
        InteractReply(
            reply=f"You said: {body.message}",
            user_id=identity.user_id,
            credits_remaining=status.credits_remaining,
            free_uses_remaining=status.free_uses_remaining,
        )
    )


#: `POST /v1/agent/interact` on a provider with weighted spends: its cost (`?cost=N` or `"cost"`) is charged.
weighted_interact = credit_gate(cost=interaction_cost)(_interact)
#: The same on a provider that takes one use per interaction.
interact = credit_gate(_interact)


async def _use_tool(request: web.Request) -> web.Response:
    product = request.match_info["product"]
    return web.json_response({"tool": product, "result": f"The demo's {product} ran."})


class ToolGates:
    """`POST /v1/agent/tools/{product}`: the demo tool, gated per product with
    `credit_gate(product=...)`, one gated handler per product name asked for (an undeclared one
    answers 404 from its gate)."""

    def __init__(self) -> None:
        self._gated: dict[str, Handler] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        product = request.match_info["product"]
        if not valid_tool_name(product):
            raise http_error(400, INVALID_NAME)
        gated = self._gated.get(product)
        if gated is None:
            gated = credit_gate(product=product)(_use_tool)
            if product in billing_service(request).provider.products:
                self._gated[product] = gated  # bounded by the declared products
        return await gated(request)


def create_demo_app(
    config: BillingConfig,
    users: UserStore,
    *,
    environ: Mapping[str, str] | None = None,
    fake_backend: FakeBillingBackend | None = None,
    fake_stripe_api: FakeStripeAPI | None = None,
) -> web.Application:
    """The demo agent; with `fake_backend` (or `fake_stripe_api`, for the `stripe` provider), the
    page's payment form is the fake Stripe.js that drives it."""
    # With the fake backend, a page on an allowed origin pays with the fake Stripe too: its confirm
    # call is cross-origin there, so its routes are opened like the billing routes.
    fake_stripe: set[web.AbstractResource] = set()
    errors = error_middleware()
    guard: Callable[[Handler], Handler] = unguarded
    paying_with = fake_backend or fake_stripe_api
    if paying_with is not None:
        app = web.Application(middlewares=[cors_middleware(errors, fake_stripe, config.cors_origins)])
    else:
        # The JSON errors bound to each route, not installed (`errors.guarded`): with no middleware
        # on the way, aiohttp runs none for a request. Unknown paths get theirs from `add_unmatched`.
        app = web.Application()
        guard = functools.partial(guarded, middleware=errors)
    env = os.environ if environ is None else environ
    wants_demo_products = config.provider == "simple" and not env.get("CIRIS_SIMPLE_PRODUCTS")
    if wants_demo_products and "products" not in config.provider_options:
        options = {**config.provider_options, "products": DEMO_PRODUCTS}
        config = config.model_copy(update={"provider_options": options})
    # The billing routes on the app's own router (one router resolve per request, not two), which
    # serves nothing else under the prefixes.
    service = setup_billing(
        app, config, authenticate=users.verify_login, environ=environ, subapp=False, claim_prefixes=True
    )
    # JSON 417 for an unknown `Expect:`; aiohttp's default answers before any middleware, in text.
    handler = weighted_interact if service.provider.weighted_spends else interact
    app.router.add_post(INTERACT_PATH, guard(handler), expect_handler=expect_continue)
    app.router.add_post(TOOL_PATH, guard(ToolGates().handle), expect_handler=expect_continue)
    app.router.add_get(ALIVE_PATH, guard(alive))
    app.router.add_get(READY_PATH, guard(ready))
    app.router.add_get(METRICS_PATH, guard(metrics))
    # What serve answered at /health before /readyz existed: kept for probes pointed at it, and
    # now as true as /readyz (it used to say ok while billing answered 503).
    app.router.add_get("/health", guard(ready))
    label = config.provider
    if paying_with is not None:
        # Only with a fake: an agent serving the real thing never loads the testing kit.
        from ..testing.fake_stripe import DEFAULT_BASE as FAKE_STRIPE
        from ..testing.fake_stripe import FakeStripe

        # Said in the capabilities, so <ciris-billing> on any page of this agent pays with it.
        service.stripe_js = FakeStripe(paying_with).add_routes(app.router, FAKE_STRIPE)
        fake_stripe.update(r for r in app.router.resources() if r.canonical.startswith(FAKE_STRIPE + "/"))
        allow_preflights(app, fake_stripe, config.cors_origins)
        label = f"{config.provider} (fake {'backend' if fake_backend is not None else 'Stripe'})"
    add_demo_page(app.router, demo_page(config, provider=label), guard)
    if paying_with is None:
        add_unmatched(app.router, guard)
    return app


def add_unmatched(router: web.UrlDispatcher, guard: Callable[[Handler], Handler]) -> None:
    """The JSON 404 or 405 for every path or method no route of the application serves, as a
    route of its own (`/{tail:.*}`: aiohttp tries every more specific path first), for an
    application without an error middleware installed."""
    resource = router.add_route("*", "/{tail:.*}", guard(unmatched_reply)).resource
    assert resource is not None
    CATCH_ALLS.add(resource)


def load_or_create_secret(data_dir: Path) -> str:
    """The JWT secret kept in the data directory, created (mode 0600) on first use."""
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(48)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(secret)
    return secret


@dataclass(frozen=True)
class CreatedUser:
    username: str
    password: str


def load_or_create_users(data_dir: Path) -> tuple[UserStore, CreatedUser | None]:
    """The demo's persisted users; on first start, one generated user (not yet saved: `save_users`
    once its password has been shown) whose password is returned this once."""
    path = data_dir / USERS_FILE
    if path.exists():
        try:
            return UserStore.load(path), None
        except ValueError as exc:  # malformed JSON, or not what `save_users` writes
            raise ConfigError(f"{path} is not a users file ({exc}); {reset_users(data_dir)}") from None
    store = UserStore()
    created = CreatedUser("demo", generate_password())
    store.add(created.username, created.password, email="demo@example.com")
    return store, created


def generate_password(length: int = 16) -> str:
    """A random password (about 95 bits for 16 characters) safe to paste as a command-line argument."""
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(length))


def reset_users(data_dir: Path) -> str:
    """What to do when the demo users' passwords are lost or their file is unreadable."""
    return f"delete {data_dir / USERS_FILE} and start again, or run serve --user NAME:PASSWORD"


def saved_usernames(data_dir: Path) -> list[str]:
    """The names in the demo's users file, for the start-up message."""
    rows = json.loads((data_dir / USERS_FILE).read_text(encoding="utf-8"))
    return [str(row["username"]) for row in rows]


def save_users(store: UserStore, data_dir: Path) -> None:
    store.save(data_dir / USERS_FILE)
