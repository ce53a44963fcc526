"""`setup_billing(app, config)`: the one call that adds billing to an aiohttp application."""

from __future__ import annotations

import os
from collections.abc import Mapping

from aiohttp import web

from .auth import VERIFIER_KEY, TokenVerifier, auth_middleware, token_check
from .auth_routes import add_auth_routes
from .config import BillingConfig, ConfigError
from .errors import error_middleware
from .login import DEFAULT_LOGIN_PATH, Authenticator
from .providers.base import CreditProvider, ProviderContext
from .providers.registry import create_provider
from .routes import add_routes
from .service import SERVICE_KEY, BillingService
from .throttle import LoginThrottle


def setup_billing(
    app: web.Application,
    config: BillingConfig,
    *,
    provider: CreditProvider | None = None,
    authenticate: Authenticator | None = None,
    login_path: str = DEFAULT_LOGIN_PATH,
    login_throttle: LoginThrottle | None = None,
    subapp: bool = True,
    environ: Mapping[str, str] | None = None,
) -> BillingService:
    """Add the billing routes, their auth and the provider's lifecycle to `app`; return the handle.

    * The routes live under `config.prefix`, by default in a sub-app so the auth and JSON-error
      middlewares cover only that prefix. With `subapp=False` they are added to `app` itself and the
      middlewares are appended to `app`, scoped to the prefix by path.
    * `config.protected_paths` also require a valid token on the host's own routes.
    * `provider` overrides the entry-point lookup of `config.provider`.
    * `authenticate` enables `POST {login_path}`, issuing tokens signed with the configured key, and
      logout, refresh and me beside it. Failed logins are throttled in memory by the config's
      limits, or by `login_throttle` (e.g. one shared by several processes).

    Everything is validated here, so bad configuration fails at startup, not on the first request.
    """
    if SERVICE_KEY in app:
        raise ConfigError("setup_billing() was already called for this application")
    verifier = TokenVerifier(config)
    if authenticate is not None and not config.jwt.can_issue:
        raise ConfigError("the login route needs a JWT secret (HS*) or a private key to sign with")
    if provider is None:
        context = ProviderContext(
            options=config.provider_options,
            environ=os.environ if environ is None else environ,
            data_dir=config.data_dir,
            agent_id=config.agent_id,
        )
        provider = create_provider(config.provider, context)
    service = BillingService(config, provider, verifier)

    app[SERVICE_KEY] = service
    app[VERIFIER_KEY] = verifier
    app.cleanup_ctx.append(service.lifespan)
    if config.protected_paths:
        app.middlewares.append(auth_middleware(verifier, config.protected_paths))
    if authenticate is not None:
        add_auth_routes(app.router, config, verifier, authenticate, login_path, login_throttle)

    check = token_check(verifier)
    if subapp:
        billing = web.Application(middlewares=[error_middleware(before=check)])
        billing[SERVICE_KEY] = service
        billing[VERIFIER_KEY] = verifier
        add_routes(billing.router, service)
        app.add_subapp(config.prefix, billing)
    else:
        app.middlewares.append(error_middleware((config.prefix,), before=check))
        add_routes(app.router, service, config.prefix)
    return service
