"""`setup_billing(app, config)`: the one call that adds billing to an aiohttp application."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import TokenVerifier, auth_middleware, token_check
from .auth_routes import add_auth_routes
from .config import BillingConfig, ConfigError
from .cors import allow_preflights, cors_middleware
from .errors import RouteGuards, error_middleware
from .events.delivery import EventDelivery
from .events.model import EventHandler
from .events.outbox import EventOutbox
from .events.sinks import CallbackSink, Sink
from .events.webhooks import WebhookSink
from .gate import check_gates
from .keys import SERVICE_KEY
from .login import Authenticator
from .openapi import APIDescription
from .ops.audit import AuditTrail
from .ops.metrics import metrics_publisher
from .ops.outbox import outbox_for
from .paths import DEFAULT_LOGIN_PATH, PathScope, mount_point
from .providers.base import CreditProvider, ProviderContext
from .providers.registry import check_provider_class, create_provider
from .routes import add_routes, provider_routes
from .service import BillingService
from .store.audit import audit_store
from .store.choose import change_feed_for
from .throttle import LoginThrottle, StoreLoginThrottle
from .tool_routes import add_tool_routes


def setup_billing(
    app: web.Application,
    config: BillingConfig,
    *,
    provider: CreditProvider | None = None,
    authenticate: Authenticator | None = None,
    login_path: str = DEFAULT_LOGIN_PATH,
    login_throttle: LoginThrottle | None = None,
    subapp: bool = True,
    claim_prefixes: bool = False,
    environ: Mapping[str, str] | None = None,
    on_event: EventHandler | None = None,
) -> BillingService:
    """Add the billing routes, their auth and the provider's lifecycle to `app`; return the handle.

    * The routes live under `config.prefix`, by default in a sub-app so the auth and JSON-error
      middlewares cover only that prefix. With `subapp=False` they are added to `app` itself and the
      middlewares are appended to `app`, scoped to the prefix by path; with `claim_prefixes` too
      (and no `cors_origins`), no middleware is added: each route answers its own errors and
      catch-all routes answer every other path under the prefixes (JSON 404/405, the token first),
      for an app that serves nothing else there (`serve`: the cheapest requests).
    * `config.protected_paths` also require a valid token on the host's own routes.
    * `config.cors_origins` lets pages on those origins call the billing routes (`cors`).
    * `provider` overrides the entry-point lookup of `config.provider`.
    * `authenticate` enables `POST {login_path}`, issuing tokens signed with the configured key, and
      logout, refresh and me beside it. Failed logins are throttled by the config's limits: in
      the database when `database_url` is set (shared by every process on it), else in memory;
      or by `login_throttle`.
    * Money and auth events go to the `ciris_billing_proxy.audit` logger and, with a
      `database_url`, to the store (`ops.audit`).
    * `on_event`, an async function, receives every billing event (`events.Event`: `balance.low`,
      `purchase.succeeded`, ...) at least once, from the delivery loop; one that raises gets the
      event again later. With `config.events_url` they are also POSTed there, signed
      (docs/events.md).

    Paths are relative to `app`: mounted with `outer.add_subapp("/agent", app)`, the routes are
    served at `/agent{prefix}` and `/agent{protected path}` needs a token. Call this before `app` is
    mounted or started.

    Everything is validated here, so bad configuration fails at startup, not on the first request.
    """
    if SERVICE_KEY in app:
        raise ConfigError("setup_billing() was already called for this application")
    if app.pre_frozen:
        raise ConfigError(
            "setup_billing() must be called before the application is mounted (add_subapp, "
            "add_domain) or started"
        )
    verifier = TokenVerifier(config)
    if authenticate is not None and not config.jwt.can_issue:
        raise ConfigError("the login route needs a JWT secret (HS*) or a private key to sign with")
    if provider is None:
        provider = create_provider(config.provider, provider_context(config, environ))
    elif not isinstance(provider, CreditProvider):
        what = f"the class {provider.__qualname__}" if isinstance(provider, type) else type(provider).__name__
        raise TypeError(
            f"setup_billing(provider=...) takes a CreditProvider instance, got {what}"
            + (" (instantiate it, or name it in config.provider)" if isinstance(provider, type) else "")
        )
    else:
        check_provider_class(type(provider), provider.name)
    if on_event is not None and not _is_async(on_event):
        raise ConfigError("setup_billing(on_event=...) takes an async function (async def)")
    database_url = config.database_url.get_secret_value() if config.database_url else None
    audit = AuditTrail(
        None if database_url is None else functools.partial(audit_store, database_url, config.database_budget)
    )
    service = BillingService(
        config,
        provider,
        verifier,
        change_feed_for(database_url, config.data_dir, config.database_budget),
        outbox_for(
            database_url, config.data_dir, config.database_budget, period=config.give_back_retry_max_seconds
        ),
        audit,
        EventOutbox(
            EventDelivery(event_sinks(config, on_event), retry_max_seconds=config.events_retry_max_seconds),
            database_url,
            config.data_dir,
            config.database_budget,
        ),
    )

    app[SERVICE_KEY] = service
    # Before the service's own entry, so its last write at shutdown comes after the service stopped;
    # the audit trail before both, so the events of the service's last money-moving work are kept.
    app.cleanup_ctx.append(audit.lifespan)
    app.cleanup_ctx.append(metrics_publisher(service))
    app.cleanup_ctx.append(_gates_checked(provider))
    app.cleanup_ctx.append(service.lifespan)
    scopes: list[PathScope] = []
    if config.protected_paths:
        scopes.append(PathScope(config.protected_paths))
        app.middlewares.append(auth_middleware(verifier, scopes[-1]))
    if authenticate is not None:
        if login_throttle is None and config.database_url is not None:
            shared = StoreLoginThrottle.from_config(config)
            app.cleanup_ctx.append(shared.lifespan)
            login_throttle = shared
        add_auth_routes(
            app.router,
            config,
            verifier,
            authenticate,
            login_path,
            login_throttle,
            service.revoke_everywhere,
            service.end_sessions,
            service.counts,
            audit,
        )

    public: set[Handler] = set()  # routes that need no token; add_routes fills it
    check = token_check(verifier, public)
    login = None if authenticate is None else login_path
    extra = provider_routes(provider)
    describe = APIDescription(
        config.prefix,
        login,
        ui=config.serve_ui,
        tools_prefix=config.tools_prefix,
        extra=[route.operation for route in extra],
    ).handle
    api: set[web.AbstractResource] = set()  # the JSON routes, which `cors_origins` opens
    requests = service.counts.requests
    # Without CORS (the default) the error middleware is bound to each route instead of installed:
    # aiohttp then runs no middleware layer for these requests unless the host has one, and the
    # token check is bound only to the routes that need one. The prefixes' unknown paths are
    # answered by catch-all routes. aiohttp-cors adds preflight routes of its own, so with origins
    # the middleware stays installed.
    guards = (
        None
        if config.cors_origins
        else RouteGuards(
            error_middleware(before=token_check(verifier), requests=requests),
            error_middleware(requests=requests),
        )
    )

    def own_routes(router: web.UrlDispatcher, prefix: str = "") -> web.AbstractResource:
        """The billing routes on a router only billing adds to (a sub-app's, or `serve`'s)."""
        return add_routes(
            router,
            service,
            prefix,
            public=public,
            api=api,
            describe=describe,
            own_router=True,
            guards=guards,
            extra=extra,
        )

    if subapp:
        protected = error_middleware(before=check, requests=requests)
        errors = cors_middleware(protected, api, config.cors_origins)
        billing = web.Application(middlewares=[] if guards else [errors])
        anchor = own_routes(billing.router)
        allow_preflights(billing, api, config.cors_origins)
        app.add_subapp(config.prefix, billing)
        tools = web.Application(middlewares=[] if guards else [protected])
        add_tool_routes(tools.router, service, own_router=True, guards=guards)
        app.add_subapp(config.tools_prefix, tools)
    elif guards is not None and claim_prefixes:
        anchor = own_routes(app.router, config.prefix)
        add_tool_routes(app.router, service, config.tools_prefix, own_router=True, guards=guards)
    else:
        scopes.append(PathScope((config.prefix, config.tools_prefix)))
        errors = error_middleware(scopes[-1], before=check, requests=requests)
        app.middlewares.append(cors_middleware(errors, api, config.cors_origins))
        anchor = add_routes(
            app.router, service, config.prefix, public=public, api=api, describe=describe, extra=extra
        )
        add_tool_routes(app.router, service, config.tools_prefix)
        allow_preflights(app, api, config.cors_origins)
    if scopes:
        app.on_startup.append(_rebase_on_mount(anchor, scopes))
    return service


def _is_async(handler: object) -> bool:
    """An `async def` function, a partial of one, or an object whose `__call__` is one."""
    if inspect.iscoroutinefunction(handler):
        return True
    return callable(handler) and inspect.iscoroutinefunction(
        inspect.getattr_static(type(handler), "__call__", None)
    )


def event_sinks(config: BillingConfig, on_event: EventHandler | None) -> list[Sink]:
    """Where billing events go: the host's callback, then the webhook."""
    sinks: list[Sink] = []
    if on_event is not None:
        sinks.append(CallbackSink(on_event))
    if config.events_url is not None and config.events_secret is not None:
        sinks.append(WebhookSink(config.events_url, config.events_secret.get_secret_value()))
    return sinks


def _gates_checked(provider: CreditProvider) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` entry: before the provider starts (the routes are final by then), every
    `@credit_gate` of the app must be one the provider can serve (`gate.check_gates`)."""

    async def check(app: web.Application) -> AsyncIterator[None]:
        check_gates(app, provider)
        yield

    return check


def provider_context(config: BillingConfig, environ: Mapping[str, str] | None = None) -> ProviderContext:
    """What the provider `config.provider` is built from (`environ`: the process environment)."""
    return ProviderContext(
        options=config.provider_options,
        environ=os.environ if environ is None else environ,
        data_dir=config.data_dir,
        agent_id=config.agent_id,
        database_url=config.database_url.get_secret_value() if config.database_url else None,
        database_budget=config.database_budget,
        low_balance_threshold=config.low_balance_threshold,
    )


def _rebase_on_mount(
    anchor: web.AbstractResource, scopes: list[PathScope]
) -> Callable[[web.Application], Awaitable[None]]:
    """An `on_startup` hook. aiohttp refuses mounts once startup has begun, so the mount point is
    final here: it is worked out once, not on each request."""
    registered_at = anchor.canonical

    async def rebase(_app: web.Application) -> None:
        mount = mount_point(anchor, registered_at)
        for scope in scopes:
            scope.rebase(mount)

    return rebase
