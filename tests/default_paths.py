"""The paths of a default setup as tests request them, built from the package's own constants
(`test_config` pins their values, the wire contract, once)."""

from __future__ import annotations

from ciris_billing_proxy.paths import (
    CREDITS_ROUTE,
    DEFAULT_LOGIN_PATH,
    DEFAULT_LOGOUT_PATH,
    DEFAULT_ME_PATH,
    DEFAULT_PREFIX,
    DEFAULT_REFRESH_PATH,
    INITIATE_ROUTE,
    STATUS_ROUTE,
    TRANSACTIONS_ROUTE,
)

BILLING = DEFAULT_PREFIX
CREDITS = DEFAULT_PREFIX + CREDITS_ROUTE
INITIATE = DEFAULT_PREFIX + INITIATE_ROUTE
#: Followed by the payment id.
STATUS = DEFAULT_PREFIX + STATUS_ROUTE
TRANSACTIONS = DEFAULT_PREFIX + TRANSACTIONS_ROUTE
LOGIN = DEFAULT_LOGIN_PATH
LOGOUT = DEFAULT_LOGOUT_PATH
REFRESH = DEFAULT_REFRESH_PATH
ME = DEFAULT_ME_PATH
