"""The credit provider interface: what the proxy asks of a billing system.

A provider is an object with async methods; the proxy owns caching, auth and HTTP. Providers raise
only the errors in `ciris_billing_proxy.errors` (`InsufficientCredit`, `BillingDisabled`,
`PaymentNotFound`, `ProviderUnavailable`, `InvalidRequest`); anything else is treated as a bug and
answered with a 500 whose body says nothing about it.

To ship a provider from another distribution, subclass `CreditProvider`, override `from_context` if
it needs settings, and register the class in the entry-point group `ciris_billing_proxy.providers`.
A provider that needs routes of its own (a payment system's webhook) declares them in `routes()`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from ..config import ConfigError, describe_validation_error
from ..database_budget import DEFAULT_BUDGET, DatabaseBudget
from ..database_url import parse_database_url
from ..errors import BillingDisabled
from ..id_token import IdToken
from ..identity import Identity
from ..ledger import Ledger, Usage
from ..models import (
    AppStorePurchase,
    CreditPack,
    CreditStatus,
    GooglePlayPurchase,
    PurchaseInitiated,
    PurchaseStatus,
    StoreVerification,
    TransactionPage,
)
from ..operations import Operation
from ..products import Product, ToolBalance, ToolCheck, ToolPurchase, ToolPurchaseRequest
from ..store import Engine, SQLiteDatabase
from ..store.choose import engine_for

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class ProviderContext:
    """What a provider is built from.

    `options` are the host's `BillingConfig.provider_options`; `environ` is where a provider reads
    its own environment variables (the process environment unless a test passes another mapping);
    `data_dir` is where it may keep files; `agent_id` namespaces anything it sends to a shared backend;
    `provider` is the name it was chosen by (for messages); `database_url` is the host's
    `BillingConfig.database_url`, which `database()` turns into an engine within `database_budget`
    (`BillingConfig.database_pool_size` and `database_timeout_seconds`);
    `low_balance_threshold` is `BillingConfig.low_balance_threshold`, for a provider that keeps
    credit on the ledger (`ciris_billing_proxy.ledger`) to pass on to it.
    """

    options: Mapping[str, Any] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)
    data_dir: Path = Path(".")
    agent_id: str = "agent"
    provider: str = "custom"
    database_url: str | None = field(default=None, repr=False)  # may carry a password
    database_budget: DatabaseBudget = DEFAULT_BUDGET
    low_balance_threshold: int | None = None

    def database(self, sqlite_file: str, path: str | Path | None = None) -> Engine:
        """The engine for the provider's records, not yet opened: PostgreSQL or a SQLite file as
        `database_url` says, and without one the file `sqlite_file` in `data_dir`. `path`, the
        provider's own SQLite file setting (a path or ":memory:"), wins over both unless empty."""
        timeout = self.database_budget.timeout_seconds
        if path:
            return SQLiteDatabase(path, timeout=timeout)
        if self.database_url is None:
            return SQLiteDatabase(self.data_dir / sqlite_file, timeout=timeout)
        try:
            url = parse_database_url(self.database_url)
        except ValueError as exc:
            raise ConfigError(f"Invalid configuration: database_url: {exc}") from None
        return engine_for(url, self.database_budget)

    def settings(self, model: type[S], env: Mapping[str, str] | None = None) -> S:
        """The provider's settings as `model`: environment variables named in `env` (variable ->
        field), overridden by `options`, validated together (strings from the environment are
        converted to the fields' types). Anything invalid is one `ConfigError` naming the provider
        and each bad field, never echoing a value (settings carry secrets)."""
        raw: dict[str, Any] = {
            field: self.environ[var] for var, field in (env or {}).items() if self.environ.get(var)
        }
        raw.update(self.options)
        try:
            return model.model_validate(raw, strict=False)
        except ValidationError as exc:
            raise ConfigError(f"{self.provider} provider: {describe_validation_error(exc)}") from None


@dataclass(frozen=True, slots=True, eq=False)
class ProviderRoute:
    """A route a provider adds to the billing routes (docs/providers.md, "Routes of your own").

    `operation` says what it is, as the package's own routes do: its method, its path below the
    billing prefix (under a first segment of the provider's own, e.g. `/stripe/webhook`), every
    error status, and whether it needs the bearer token (`bearer`): an authenticated handler reads
    the caller with `ciris_billing_proxy.get_identity(request)`, a public one (`bearer=False`, a
    webhook that proves itself with its own signature) is reached without a token. It is listed in
    the OpenAPI document, answers `Expect:` like the others, and an error it raises (`BillingError`,
    `web.HTTPException` with a JSON body) reaches the client as JSON `{"detail": ...}`."""

    operation: Operation
    handler: Handler


class CreditProvider(abc.ABC):
    """Base class of every credit provider.

    Idempotency: `spend` and `give_back` take a key that is unique per agent request. Calling either
    twice with the same key must have the effect of calling it once.
    """

    #: The entry-point name; informational (logs, startup banner).
    name: ClassVar[str] = "custom"

    @classmethod
    def from_context(cls, context: ProviderContext) -> Self:
        """Build the provider from options and environment. Invalid settings raise `ConfigError`."""
        return cls()

    @property
    def purchases_enabled(self) -> bool:
        """Whether users can buy credits. When false, both purchase routes answer 403."""
        return False

    @property
    def keeps_transactions(self) -> bool:
        """Whether `transactions` lists the user's real history. When false, `/capabilities` tells
        a UI not to offer one (the route still answers, with an empty page)."""
        return False

    @property
    def google_play_enabled(self) -> bool:
        """Whether `verify_google_play` redeems Google Play purchases. When false, its route answers
        403 and `/capabilities` says `google_play: false`."""
        return False

    @property
    def apple_storekit_enabled(self) -> bool:
        """Whether `verify_app_store` redeems App Store purchases (as `google_play_enabled`)."""
        return False

    @property
    def gate_charges(self) -> bool:
        """Whether the credit gate takes a use per interaction (`spend`). When false the gate only
        checks that the user has credit ("informational": something else charges), and
        `/capabilities` says `charges: false`."""
        return True

    @property
    def eager_spends(self) -> bool:
        """Whether the service may start `spend`, `spend_weighted` and `reserve` on the caller's
        stack (`eager.start_eagerly`) rather than in a task of their own. Only for a provider whose
        spend, until it first waits, enters no timeout or other context bound to the running task
        (`asyncio.timeout`, an HTTP client's timeout): one entered there would stay bound to the
        caller's task while the spend goes on in another. False by default."""
        return False

    @property
    def weighted_spends(self) -> bool:
        """Whether the provider takes spends of any cost (`spend_weighted`) and reservations
        (`reserve`, `settle`). A `@credit_gate` with a cost other than 1, or a reservation, needs
        it: the app refuses to start otherwise."""
        return False

    @property
    def credit_ledger(self) -> Ledger | None:
        """The ledger the provider keeps its credit on, when it uses this package's
        (`ciris_billing_proxy.ledger`): the admin routes and `GET {prefix}/usage` read and change
        it. None (the default) for a provider whose credit lives elsewhere: those routes answer 404."""
        return None

    @property
    def id_token_required(self) -> bool:
        """Whether every billing request must carry the user's ID token (`X-Google-ID-Token` or
        `X-Apple-ID-Token`): the proxy answers 401 without one, before the credit cache is read.
        The provider reads the token with `ciris_billing_proxy.current_id_token()`."""
        return False

    def agent_id_token(self) -> IdToken | None:
        """The ID token configured for this agent, used (with `id_token_required`) for a request that
        carries none: an agent on the user's own device, whose app writes the user's token into the
        agent's environment. None by default: each request must bring its own. Called per request
        that lacks the header, so it must be cheap (no I/O on every call)."""
        return None

    @property
    def events_engine(self) -> Engine | None:
        """The engine this provider writes billing events to (`store.events.add_sqlite` or
        `add_postgres`, in the transaction of the change each tells of), or None when it writes
        none. Opened by `start` and closed by `stop`: the event delivery reads and marks the
        `billing_events` table on it while the provider runs (it brings that table's schema up to
        date after `start`). A provider that names one writes every event it causes itself,
        `purchase.succeeded` included; for one that names none, the service keeps the events it
        emits (`purchase.succeeded`) in its own outbox (docs/events.md). By default the engine of
        `credit_ledger`, which writes its events there."""
        ledger = self.credit_ledger
        return None if ledger is None else ledger.engine

    def routes(self) -> Sequence[ProviderRoute]:
        """Routes of the provider's own, added beside the billing routes when the app is set up
        (none by default). Asked once, before `start`; the handlers may be called only after it."""
        return ()

    async def start(self) -> None:
        """Open connections, files and sessions. Called once at app startup."""

    async def stop(self) -> None:
        """Release what `start` opened. Called once at app cleanup, also after a failed start."""

    async def health(self) -> str | None:
        """None when the provider can serve; otherwise why not, in a few words an operator reads
        (never a URL, key or other secret), e.g. "backend refused the API key (HTTP 401)".

        Called by the readiness check (`GET /readyz`, `BillingService.health()`), once at startup
        and whenever it is asked, with a time limit of a few seconds: make it one cheap call that
        changes nothing (a failure raised here counts as not ready too). The default says ready."""
        return None

    @abc.abstractmethod
    async def credit_status(self, identity: Identity) -> CreditStatus:
        """The user's current credit. May create the account on first sight."""

    @abc.abstractmethod
    async def spend(self, identity: Identity, idempotency_key: str) -> CreditStatus | None:
        """Take one use, atomically. Raise `InsufficientCredit` when there is none.

        May return the user's `CreditStatus` as of right after the spend, when the spend's own
        transaction tells it (the gated handler can then answer with it instead of reading the
        status again: `keys.SPENT_STATUS_KEY`); None when it does not know."""

    @abc.abstractmethod
    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        """Return what `spend` (or `spend_weighted`, or `reserve`) took under `idempotency_key`,
        all of it; no-op if nothing was taken."""

    async def spend_weighted(
        self, identity: Identity, idempotency_key: str, cost: int
    ) -> CreditStatus | None:
        """Take `cost` (1 or more) as `spend` takes one, all or nothing. Only called when
        `weighted_spends`."""
        raise BillingDisabled

    async def reserve(self, identity: Identity, idempotency_key: str, amount: int) -> CreditStatus | None:
        """Take up to `amount` before a handler whose cost is known afterwards; `settle` keeps part
        of it, `give_back` returns all of it. Only called when `weighted_spends`."""
        raise BillingDisabled

    async def settle(self, identity: Identity, idempotency_key: str, cost: int, usage: Usage | None) -> None:
        """Keep `cost` of the reservation under this key (at most what it reserved) and give the
        rest back; once (a repeat changes nothing)."""
        raise BillingDisabled

    async def record_usage(self, identity: Identity, idempotency_key: str, usage: Usage) -> None:
        """Keep what the spend under this key was for (the handler's `billing_spend(request).usage`).
        A provider that keeps no usage ignores it (the default)."""

    async def give_back_owed(self, identity: Identity, idempotency_key: str, owed_since: float) -> None:
        """`give_back`, for a give-back owed since `owed_since` (Unix time) by a process that may
        have stopped since (the give-back outbox makes those): a provider that keeps what a give-back
        needs in memory only must find it again here. `identity` has the user's id, namespace,
        role, email and tenant, not the token's expiry. By default, `give_back`."""
        await self.give_back(identity, idempotency_key)

    @property
    def packs(self) -> Sequence[CreditPack]:
        """The packs `initiate_purchase` sells by id, the default first (`/capabilities` lists
        them); none by default: a provider that sells one unnamed pack is never asked for one."""
        return ()

    async def initiate_purchase(
        self,
        identity: Identity,
        return_url: str | None,
        idempotency_key: str | None,
        pack: str | None = None,
    ) -> PurchaseInitiated:
        """Start a purchase. Only called when `purchases_enabled`.

        `idempotency_key` is the client's `Idempotency-Key` header, if any: replay the earlier reply
        for the same *user and* key, never another user's (it carries their Stripe client secret).
        `pack` is the id of one of `packs` the user chose (checked before); passed only when one
        was asked for, so a provider that declares no packs need not take it.
        """
        raise BillingDisabled

    async def purchase_status(self, identity: Identity, payment_id: str) -> PurchaseStatus:
        """Status of a purchase this user started; `PaymentNotFound` for anyone else's id."""
        raise BillingDisabled

    async def verify_google_play(self, identity: Identity, purchase: GooglePlayPurchase) -> StoreVerification:
        """Redeem a Google Play purchase for this user; only called when `google_play_enabled`.

        Exactly once per purchase token: a repeat answers `already_processed: true` and adds nothing.
        A purchase the store refuses is `success: false` with a readable `error` (the mobile apps
        read that, not an error status); raise `ProviderUnavailable` only when no answer was had.
        """
        raise BillingDisabled

    async def verify_app_store(self, identity: Identity, purchase: AppStorePurchase) -> StoreVerification:
        """Redeem an App Store transaction, as `verify_google_play`; only called when
        `apple_storekit_enabled`."""
        raise BillingDisabled

    async def transactions(self, identity: Identity, limit: int, offset: int) -> TransactionPage:
        """The user's transactions, newest first (`limit` 1-100, `offset` >= 0, already checked).
        A provider that keeps no history answers an empty page."""
        return TransactionPage(transactions=[], total_count=0, has_more=False)

    # -- per-product credits (tool credits): docs/tool-credits.md ------------------------------------
    @property
    def products(self) -> Mapping[str, Product]:
        """The products this provider sells per use, by name (`Product.name`); none by default. The
        tool routes and `@credit_gate(product=...)` serve only these: another name is a 404."""
        return {}

    @property
    def product_purchases_enabled(self) -> bool:
        """Whether `verify_product_purchase` redeems store purchases of product packs. When false,
        `POST {tools}/purchase` answers 200 `success: false` without calling it."""
        return False

    async def product_balance(self, identity: Identity, product: str) -> ToolBalance:
        """The user's balance of one declared product (the name is checked before)."""
        raise BillingDisabled

    async def product_balances(self, identity: Identity) -> list[ToolBalance]:
        """Every declared product's balance, in declaration order; by default one
        `product_balance` per product."""
        return [await self.product_balance(identity, name) for name in self.products]

    async def product_check(self, identity: Identity, product: str) -> ToolCheck:
        """Whether a gated call of the product would pass now; by default from `product_balance`."""
        return ToolCheck.of(await self.product_balance(identity, product))

    async def spend_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        """Take one use of the product, atomically (as `spend`); `InsufficientCredit` without one."""
        raise BillingDisabled

    async def give_back_product(self, identity: Identity, product: str, idempotency_key: str) -> None:
        """Return the use `spend_product` took under this key (as `give_back`)."""
        raise BillingDisabled

    async def verify_product_purchase(
        self, identity: Identity, purchase: ToolPurchaseRequest
    ) -> ToolPurchase:
        """Redeem a store purchase of a pack of `purchase.tool_name` (a declared product), once per
        purchase token: a repeat raises `AlreadyProcessed`, a purchase the store refuses
        `InvalidRequest`. Only called when `product_purchases_enabled`."""
        raise BillingDisabled
