"""Which request paths a prefix covers, relative to the application it was configured on.

`request.path` is the full path: an application mounted with `outer.add_subapp("/agent", app)` sees
`/agent/health` for its own `/health`. Prefixes are therefore rebased onto the application's mount
point once, at startup, when every mount is known; matching a request is then a plain string test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from aiohttp import web

#: Where the billing routes are unless `BillingConfig.prefix` says otherwise.
DEFAULT_PREFIX: Final = "/v1/api/billing"
#: Where the tool routes (per-product credits) are unless `BillingConfig.tools_prefix` says otherwise,
#: as the CIRIS agent serves them.
DEFAULT_TOOLS_PREFIX: Final = "/v1/api/tools"
#: The billing routes, below the prefix. `STATUS_ROUTE` is followed by the payment id.
CAPABILITIES_ROUTE: Final = "/capabilities"
CREDITS_ROUTE: Final = "/credits"
INITIATE_ROUTE: Final = "/purchase/initiate"
STATUS_ROUTE: Final = "/purchase/status/"
TRANSACTIONS_ROUTE: Final = "/transactions"
#: The caller's usage totals, and the admin routes' root (`credit_routes`).
USAGE_ROUTE: Final = "/usage"
ADMIN_ROUTE: Final = "/admin"
GOOGLE_PLAY_ROUTE: Final = "/google-play/verify"
APP_STORE_ROUTE: Final = "/apple-storekit/verify"
#: The login route `setup_billing(authenticate=...)` adds unless `login_path` says otherwise; logout,
#: refresh and me sit beside it.
DEFAULT_LOGIN_PATH: Final = "/v1/auth/login"
DEFAULT_LOGOUT_PATH: Final = "/v1/auth/logout"
DEFAULT_REFRESH_PATH: Final = "/v1/auth/refresh"
DEFAULT_ME_PATH: Final = "/v1/auth/me"


class PathScope:
    """Prefixes such as `/v1/agent`: each covers itself and anything below it (`/v1/agent/x`, not
    `/v1/agents`); `/` covers everything."""

    __slots__ = ("_below", "_exact", "_relative")

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self._relative = tuple(p.rstrip("/") for p in prefixes)
        self.rebase("")

    def rebase(self, mount: str) -> None:
        """Match the prefixes under `mount`, the path the application is mounted at."""
        absolute = [mount + p for p in self._relative]
        self._exact = frozenset(absolute)
        self._below = tuple(p + "/" for p in absolute)

    def covers(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._below)


def as_scope(prefixes: Sequence[str] | PathScope) -> PathScope:
    """A scope as given, or one for prefixes matched against the full request path."""
    return prefixes if isinstance(prefixes, PathScope) else PathScope(tuple(prefixes))


def mount_point(resource: web.AbstractResource, registered_at: str) -> str:
    """The path the application holding `resource` (added at `registered_at`) is mounted at: "" at
    the top or on a domain (`add_domain`), `/agent` under `add_subapp("/agent", ...)`, at any depth.

    aiohttp prefixes every resource of a sub-application when it is mounted (which is how `url_for`
    gives full paths), so the mount point is what now precedes the path the resource was added at.
    """
    return resource.canonical.removesuffix(registered_at)
