"""ciris-billing-proxy: the agent billing proxy routes for any aiohttp application.

from ciris_billing_proxy import BillingConfig, setup_billing, credit_gate, get_identity

billing = setup_billing(app, BillingConfig.from_env())
"""

from .auth import get_identity
from .bodies import expect_continue
from .config import BillingConfig, ConfigError, JWTConfig
from .errors import (
    AlreadyProcessed,
    BillingDisabled,
    BillingError,
    IdTokenRequired,
    InsufficientCredit,
    InvalidRequest,
    PaymentNotFound,
    ProviderUnavailable,
    TooManyRequests,
    error_middleware,
)
from .gate import credit_gate
from .id_token import IdToken, current_id_token
from .identity import Identity
from .login import AuthenticatedUser, Authenticator
from .models import (
    AppStorePurchase,
    Capabilities,
    CreditStatus,
    GooglePlayPurchase,
    PurchaseInitiated,
    PurchaseOptions,
    PurchaseStatus,
    StoreVerification,
    Transaction,
    TransactionPage,
)
from .operations import Operation
from .ops.health import Health, add_health_routes
from .ops.metrics import BillingCollector, add_metrics_route, metrics_text
from .providers.base import CreditProvider, ProviderContext, ProviderRoute
from .service import BillingService
from .setup import setup_billing
from .store import DatabaseUnavailable
from .version import __version__

__all__ = [
    "AlreadyProcessed",
    "AppStorePurchase",
    "AuthenticatedUser",
    "Authenticator",
    "BillingCollector",
    "BillingConfig",
    "BillingDisabled",
    "BillingError",
    "BillingService",
    "Capabilities",
    "ConfigError",
    "CreditProvider",
    "CreditStatus",
    "DatabaseUnavailable",
    "GooglePlayPurchase",
    "Health",
    "IdToken",
    "IdTokenRequired",
    "Identity",
    "InsufficientCredit",
    "InvalidRequest",
    "JWTConfig",
    "Operation",
    "PaymentNotFound",
    "ProviderContext",
    "ProviderRoute",
    "ProviderUnavailable",
    "PurchaseInitiated",
    "PurchaseOptions",
    "PurchaseStatus",
    "StoreVerification",
    "TooManyRequests",
    "Transaction",
    "TransactionPage",
    "__version__",
    "add_health_routes",
    "add_metrics_route",
    "credit_gate",
    "current_id_token",
    "error_middleware",
    "expect_continue",
    "get_identity",
    "metrics_text",
    "setup_billing",
]
