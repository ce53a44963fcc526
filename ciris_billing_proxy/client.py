"""An async Python client for an agent's billing routes (this package's, or any CIRIS agent's).

    async with BillingClient("http://127.0.0.1:8000") as client:
        await client.login("demo", "password")
        credits = await client.get_credits()

Replies are parsed with the wire-contract models of `ciris_billing_proxy.models` (`CreditStatusReply`,
...), which the server's own models extend, so the two cannot drift; they accept what
docs/compatibility.md lets any CIRIS agent send (a null `balance_after`, extra fields) and nothing
looser (a JSON `true` is no count). Every failure is a `BillingClientError`: HTTP errors carry the
status code and `detail`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ValidationError
from yarl import URL

from .credit_models import AdminCredits, AdminGrantReply, AuditPage, UsageReport
from .id_token import GOOGLE_HEADER
from .models import (
    CapabilitiesReply,
    CreditStatusReply,
    LoginReply,
    PurchaseInitiatedReply,
    PurchaseStatusReply,
    StoreVerificationReply,
    TransactionPageReply,
    UserInfoReply,
)
from .paths import (
    ADMIN_ROUTE,
    APP_STORE_ROUTE,
    CAPABILITIES_ROUTE,
    CREDITS_ROUTE,
    DEFAULT_LOGIN_PATH,
    DEFAULT_LOGOUT_PATH,
    DEFAULT_ME_PATH,
    DEFAULT_PREFIX,
    DEFAULT_REFRESH_PATH,
    DEFAULT_TOOLS_PREFIX,
    GOOGLE_PLAY_ROUTE,
    INITIATE_ROUTE,
    STATUS_ROUTE,
    TRANSACTIONS_ROUTE,
    USAGE_ROUTE,
)
from .products import AvailableTools, ToolBalance, ToolBalances, ToolCheck, ToolPurchase

M = TypeVar("M", bound=BaseModel)

FAILED_STATES: Final = frozenset({"failed", "canceled"})
MAX_REPLY_BYTES: Final = 1024 * 1024


class BillingClientError(Exception):
    """Base of every error the client raises."""


class BillingConnectionError(BillingClientError):
    """The server could not be reached, or did not answer within the timeout."""


class BillingAPIError(BillingClientError):
    """The server answered with an error status. `detail` is its `{"detail": ...}` (or raw text)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class InvalidRequestError(BillingAPIError):
    """400, 413 or 422: the request was refused as malformed."""


class RateLimitedError(BillingAPIError):
    """429: too many requests; try again later."""


class AlreadyProcessedError(BillingAPIError):
    """409: a store purchase redeemed before (`purchase_tool`): nothing was added."""


class AuthenticationError(BillingAPIError):
    """401: no, bad or expired token, or wrong credentials at login."""


class InsufficientCreditError(BillingAPIError):
    """402: no credit left (from a credit-gated agent endpoint)."""


class BillingNotEnabled(BillingAPIError):
    """403 "Billing not enabled for this agent": the agent sells no credits."""


class ForbiddenError(BillingAPIError):
    """Any other 403."""


class NotFoundError(BillingAPIError):
    """404, e.g. a payment that is not this user's."""


class ServiceUnavailableError(BillingAPIError):
    """5xx: the agent or its billing backend is unavailable; try again later."""


class InvalidReplyError(BillingClientError):
    """A success reply that does not fit the billing contract."""


class PurchaseFailed(BillingClientError):
    """The payment ended as failed or canceled (`.purchase` is the last status seen)."""

    def __init__(self, purchase: PurchaseStatusReply) -> None:
        super().__init__(f"payment {purchase.status}")
        self.purchase = purchase


class PurchaseTimeout(BillingClientError):
    """`wait_for_purchase` ran out of attempts before the payment settled. `.last` is the last status
    seen (None if every poll failed) and `.error` the last transient error, if any."""

    def __init__(
        self, last: PurchaseStatusReply | None, attempts: int, error: BillingClientError | None = None
    ) -> None:
        shown = f"still {last.status}" if last is not None else f"unknown ({error})"
        super().__init__(f"payment {shown} after {attempts} attempts")
        self.last = last
        self.error = error


def error_for(status: int, detail: Any) -> BillingAPIError:
    if status == 401:
        return AuthenticationError(status, detail)
    if status == 402:
        return InsufficientCreditError(status, detail)
    if status == 403:
        if isinstance(detail, str) and "billing not enabled" in detail.lower():
            return BillingNotEnabled(status, detail)
        return ForbiddenError(status, detail)
    if status == 404:
        return NotFoundError(status, detail)
    if status == 409:
        return AlreadyProcessedError(status, detail)
    if status == 429:
        return RateLimitedError(status, detail)
    if status >= 500:
        return ServiceUnavailableError(status, detail)
    if status in (400, 413, 422):
        return InvalidRequestError(status, detail)
    return BillingAPIError(status, detail)


#: Errors after which polling a payment may simply go on.
TRANSIENT: Final = (ServiceUnavailableError, RateLimitedError, BillingConnectionError)


class BillingClient:
    """An async client for one agent's billing routes, used as `async with BillingClient(url) as c:`.

    `login(username, password)` keeps the token it gets (or pass `token=`); then `get_credits()`,
    `initiate_purchase(return_url=None, *, idempotency_key=None)`, `get_purchase_status(payment_id)`,
    `wait_for_purchase(payment_id)`, `get_transactions(limit, offset)`, `capabilities()`,
    `verify_google_play(...)`, `verify_app_store(...)`, the tool credits under `tools_prefix`
    (`get_tool_balance(tool)`, `get_tool_balances()`, `check_tool(tool)`, `get_available_tools()`,
    `purchase_tool(...)`), the ledger's `get_usage(...)` and, with an admin's token,
    `admin_user_credits(user_id)`, `admin_grant(user_id, amount, reason, ...)`, `admin_audit(...)`
    (docs/credits.md), and `me()`, `refresh()`, `logout()` for the auth routes. `id_token` (sent in
    `id_token_header`, `X-Google-ID-Token` by default) is the
    user's own ID token, for an agent whose provider calls its backend as the user. Replies are the
    wire-contract models of `ciris_billing_proxy.models` (`CreditStatusReply`, ...). Every failure is
    a `BillingClientError`: `BillingAPIError` (with `status` and `detail`; a subclass per status,
    e.g. `BillingNotEnabled`), `BillingConnectionError`, or `InvalidReplyError` for a reply outside
    the contract. `prefix` is where the billing routes are (`/v1/api/billing` by default).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        token: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        on_unauthorized: Callable[[BillingClient], Awaitable[None]] | None = None,
        id_token: str | None = None,
        id_token_header: str = GOOGLE_HEADER,
        tools_prefix: str = DEFAULT_TOOLS_PREFIX,
    ) -> None:
        """`on_unauthorized(client)`, if given, is awaited once when a call gets a 401 (typically
        to `login` again); the call is then retried once with the new token."""
        url = URL(base_url)
        if not url.is_absolute() or url.scheme not in ("http", "https"):
            raise ValueError("base_url must be an absolute http(s) URL")
        if url.query_string or url.fragment:
            raise ValueError("base_url must not have a query or a fragment")
        self.base_url = base_url.rstrip("/")
        # What messages show: never the password of a URL that carries one.
        self._shown_url = str(url.with_user(None).with_password(None)).rstrip("/")
        self.prefix = prefix.rstrip("/")
        self.tools_prefix = tools_prefix.rstrip("/")
        self.token = token
        self.id_token = id_token
        self.id_token_header = id_token_header
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._on_unauthorized = on_unauthorized
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"X-API-Version": "v1"})
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the calls ------------------------------------------------------------------------------
    async def login(self, username: str, password: str) -> LoginReply:
        body = await self.request(
            "POST", DEFAULT_LOGIN_PATH, json_body={"username": username, "password": password}, auth=False
        )
        reply = _parse(LoginReply, body)
        self.token = reply.access_token
        return reply

    async def logout(self, *, everywhere: bool = False) -> None:
        """Revoke the current token on the agent, and forget it; with `everywhere=True`, every
        token of the user issued until now (their other sessions and devices too)."""
        await self.request(
            "POST", DEFAULT_LOGOUT_PATH, json_body={"everywhere": True} if everywhere else None
        )
        self.token = None

    async def refresh(self) -> LoginReply:
        """Trade the current token for a new one (the agent revokes the old one); keeps the new one."""
        reply = _parse(LoginReply, await self.request("POST", DEFAULT_REFRESH_PATH, json_body={}))
        self.token = reply.access_token
        return reply

    async def me(self) -> UserInfoReply:
        return _parse(UserInfoReply, await self.request("GET", DEFAULT_ME_PATH))

    async def get_credits(self) -> CreditStatusReply:
        return _parse(CreditStatusReply, await self.request("GET", self.prefix + CREDITS_ROUTE))

    async def capabilities(self) -> CapabilitiesReply:
        """What the agent's provider offers (`purchases`, `transactions`, `google_play`,
        `apple_storekit`, `charges`): ask before offering a buy button. Agents older than the route
        answer 404 (`NotFoundError`)."""
        return _parse(CapabilitiesReply, await self.request("GET", self.prefix + CAPABILITIES_ROUTE))

    async def verify_google_play(
        self, purchase_token: str, product_id: str, package_name: str
    ) -> StoreVerificationReply:
        """Redeem a Google Play purchase. A purchase the store refuses is not an exception: the
        reply says `success: False` with an `error`; a repeat says `already_processed: True`."""
        body = {"purchase_token": purchase_token, "product_id": product_id, "package_name": package_name}
        reply = await self.request("POST", self.prefix + GOOGLE_PLAY_ROUTE, json_body=body)
        return _parse(StoreVerificationReply, reply)

    async def verify_app_store(
        self, transaction_id: str, product_id: str | None = None
    ) -> StoreVerificationReply:
        """Redeem an App Store transaction, as `verify_google_play` (the iOS app sends no product)."""
        body = {"transaction_id": transaction_id}
        if product_id is not None:
            body["product_id"] = product_id
        reply = await self.request("POST", self.prefix + APP_STORE_ROUTE, json_body=body)
        return _parse(StoreVerificationReply, reply)

    async def initiate_purchase(
        self, return_url: str | None = None, *, idempotency_key: str | None = None, pack: str | None = None
    ) -> PurchaseInitiatedReply:
        """Start a purchase; `pack` is the id of one of `capabilities().packs` (None: the default)."""
        body = {"return_url": return_url} if return_url else {}
        if pack:
            body["pack"] = pack
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        reply = await self.request("POST", self.prefix + INITIATE_ROUTE, json_body=body, headers=headers)
        return _parse(PurchaseInitiatedReply, reply)

    async def get_purchase_status(self, payment_id: str) -> PurchaseStatusReply:
        path = self.prefix + STATUS_ROUTE + quote(payment_id, safe="")
        return _parse(PurchaseStatusReply, await self.request("GET", path))

    async def wait_for_purchase(
        self,
        payment_id: str,
        interval: float = 2.0,
        max_attempts: int = 30,
        *,
        on_poll: Callable[[int, PurchaseStatusReply | None], None] | None = None,
    ) -> PurchaseStatusReply:
        """Poll until the payment settles, as the UI does: return on `succeeded`, raise
        `PurchaseFailed` on `failed`/`canceled`, `PurchaseTimeout` after the last attempt. A poll that
        meets a passing fault (5xx, 429, no connection) counts as an attempt and polling goes on;
        any other error (401, 404, ...) is raised at once."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        last: PurchaseStatusReply | None = None
        error: BillingClientError | None = None
        for attempt in range(1, max_attempts + 1):
            try:
                last = await self.get_purchase_status(payment_id)
            except TRANSIENT as exc:
                error = exc
                if on_poll is not None:
                    on_poll(attempt, None)
            else:
                error = None
                if on_poll is not None:
                    on_poll(attempt, last)
                if last.status == "succeeded":
                    return last
                if last.status in FAILED_STATES:
                    raise PurchaseFailed(last)
            if attempt < max_attempts:
                await asyncio.sleep(interval)
        raise PurchaseTimeout(last, max_attempts, error)

    async def get_transactions(self, limit: int = 50, offset: int = 0) -> TransactionPageReply:
        params = {"limit": str(limit), "offset": str(offset)}
        reply = await self.request("GET", self.prefix + TRANSACTIONS_ROUTE, params=params)
        return _parse(TransactionPageReply, reply)

    # -- the credit ledger (docs/credits.md) -------------------------------------------------------
    async def get_usage(
        self, *, since: str | None = None, until: str | None = None, group_by: str = "day"
    ) -> UsageReport:
        """The caller's spends totalled per `day`, `model` or `product` over the UTC days
        [since, until) (`YYYY-MM-DD`; by default the last 30 days)."""
        params = {"group_by": group_by} | _given(("from", since), ("to", until))
        return _parse(UsageReport, await self.request("GET", self.prefix + USAGE_ROUTE, params=params))

    async def admin_user_credits(self, user_id: str, *, namespace: str | None = None) -> AdminCredits:
        """Admin: a user's balance and grants (`ForbiddenError` for a token without an admin role)."""
        path = f"{self.prefix}{ADMIN_ROUTE}/users/{quote(user_id, safe='')}/credits"
        return _parse(AdminCredits, await self.request("GET", path, params=_given(("namespace", namespace))))

    async def admin_grant(
        self,
        user_id: str,
        amount: int,
        reason: str,
        *,
        kind: str | None = None,
        note: str | None = None,
        expires_at: str | None = None,
        namespace: str | None = None,
        idempotency_key: str | None = None,
    ) -> AdminGrantReply:
        """Admin: grant credit (`amount` > 0) or take it back (< 0) with a reason code."""
        path = f"{self.prefix}{ADMIN_ROUTE}/users/{quote(user_id, safe='')}/grants"
        body = {"amount": amount, "reason": reason} | _given(
            ("kind", kind), ("note", note), ("expires_at", expires_at)
        )
        headers = _given(("Idempotency-Key", idempotency_key))
        reply = await self.request(
            "POST", path, json_body=body, params=_given(("namespace", namespace)), headers=headers
        )
        return _parse(AdminGrantReply, reply)

    async def admin_audit(
        self,
        *,
        user_id: str | None = None,
        since: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> AuditPage:
        """Admin: the journal of credit changes, newest first."""
        params = {"limit": str(limit), "offset": str(offset)} | _given(
            ("user_id", user_id), ("since", since), ("kind", kind)
        )
        return _parse(
            AuditPage, await self.request("GET", f"{self.prefix}{ADMIN_ROUTE}/audit", params=params)
        )

    # -- tool credits (docs/tool-credits.md), under `tools_prefix` ------------------------------------
    async def get_tool_balance(self, tool: str) -> ToolBalance:
        """One product's balance; `NotFoundError` for a product the agent does not sell."""
        reply = await self.request("GET", f"{self.tools_prefix}/balance/{quote(tool, safe='')}")
        return _parse(ToolBalance, reply)

    async def get_tool_balances(self) -> ToolBalances:
        return _parse(ToolBalances, await self.request("GET", f"{self.tools_prefix}/balance"))

    async def check_tool(self, tool: str) -> ToolCheck:
        reply = await self.request("GET", f"{self.tools_prefix}/check/{quote(tool, safe='')}")
        return _parse(ToolCheck, reply)

    async def get_available_tools(self) -> AvailableTools:
        return _parse(AvailableTools, await self.request("GET", f"{self.tools_prefix}/available"))

    async def purchase_tool(self, product_id: str, purchase_token: str, tool_name: str) -> ToolPurchase:
        """Redeem a store purchase of a tool pack; a repeat raises `AlreadyProcessedError` (409)."""
        body = {"product_id": product_id, "purchase_token": purchase_token, "tool_name": tool_name}
        return _parse(
            ToolPurchase, await self.request("POST", f"{self.tools_prefix}/purchase", json_body=body)
        )

    # -- the transport --------------------------------------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        unwrap: bool = True,
    ) -> Any:
        """One call; the decoded JSON of a 2xx reply (None for a 204), or a typed error. Public for
        tools (the QA command) that check replies field by field rather than through the models.
        With `unwrap`, a `{"data": {...}}` envelope is opened, as the CIRIS SDK does."""
        status, body = await self._send(method, path, json_body, params, headers, auth, unwrap)
        if status == 401 and auth and self._on_unauthorized is not None:
            await self._on_unauthorized(self)
            status, body = await self._send(method, path, json_body, params, headers, auth, unwrap)
        if status >= 400:
            detail = body.get("detail", body) if isinstance(body, dict) else body
            raise error_for(status, detail)
        return body

    async def _send(
        self,
        method: str,
        path: str,
        json_body: Any,
        params: dict[str, str] | None,
        headers: dict[str, str] | None,
        auth: bool,
        unwrap: bool,
    ) -> tuple[int, Any]:
        if self._session is None:
            raise BillingClientError("use the client as `async with BillingClient(...) as client:`")
        all_headers = dict(headers or {})
        if auth and self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        if auth and self.id_token:
            all_headers[self.id_token_header] = self.id_token
        try:
            async with self._session.request(
                method, self.base_url + path, json=json_body, params=params, headers=all_headers
            ) as resp:
                status, content_type = resp.status, resp.content_type
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_REPLY_BYTES:  # never hold an endless or huge body in memory
                        raise InvalidReplyError(f"{method} {path} answered more than {MAX_REPLY_BYTES} bytes")
                    chunks.append(chunk)
                raw = b"".join(chunks)
        except TimeoutError:
            raise BillingConnectionError(f"no answer from {self._shown_url} in time") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc).__name__
            raise BillingConnectionError(f"cannot reach {self._shown_url}: {reason}") from None
        except aiohttp.ClientError as exc:
            raise BillingConnectionError(f"cannot reach {self._shown_url}: {type(exc).__name__}") from None
        try:
            body: Any = json.loads(raw) if raw else None
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            # A non-JSON error page is summarised, not passed on whole (it may be a long HTML page).
            body = f"{content_type or 'unknown type'} reply of {len(raw)} bytes"
        # 204 has no body by definition (some agents answer logout with it).
        if 200 <= status < 300 and status != 204 and not isinstance(body, dict):
            raise InvalidReplyError(f"{method} {path} answered {status} without a JSON object")
        if unwrap and isinstance(body, dict) and set(body) == {"data"} and isinstance(body["data"], dict):
            body = body["data"]
        return status, body


def _given(*pairs: tuple[str, str | None]) -> dict[str, str]:
    return {name: value for name, value in pairs if value is not None}


def _parse(model: type[M], body: Any) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'reply'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidReplyError(f"{model.__name__} does not fit the contract: {problems}") from None
