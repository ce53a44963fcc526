"""HTTP to the billing backend: one session, time budgets, retries, failover, and fault classification.

* Idempotent calls (checks, reads, and charges/credits carrying an idempotency key) are retried on
  timeouts, network errors, 5xx, 429 and malformed JSON, with exponential backoff, each retry on the
  next base URL, all inside one time budget.
* Non-idempotent calls (purchases: each one is a new PaymentIntent) move to the next base URL only when
  the connection could not be made at all, so the request provably never left; otherwise they fail.
* A rejected API key (401, or 403 "Missing required permission") is logged at ERROR, once per call,
  without the key. A call made with the user's ID token (`bearer`) that gets a 401 raises
  `IdTokenRefused`: the user's sign-in is stale, the agent's configuration is fine.

Log lines name the endpoint and what went wrong, never the backend URL, the key, an ID token or a
response body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from .settings import CirisSettings

logger = logging.getLogger("ciris_billing_proxy.ciris")

USER_AGENT = "ciris-billing-proxy"


class BackendUnavailable(Exception):
    """The backend could not give a usable answer within the budget. `reason` is safe to log.

    `maybe_applied` is false when the request provably had no effect (it never left, or the
    backend refused it outright); after a timeout, a reset or a 5xx, it may have taken effect.
    """

    def __init__(self, reason: str, *, maybe_applied: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.maybe_applied = maybe_applied


class KeyRejected(BackendUnavailable):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, maybe_applied=False)


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def detail(self) -> str:
        if isinstance(self.body, dict):
            detail = self.body.get("detail")
            if isinstance(detail, str):
                return detail
        return ""


class IdTokenRefused(Exception):
    """The backend answered 401 to a call made with the user's ID token."""


class _Transient(Exception):
    def __init__(self, reason: str, *, sent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent


class Transport:
    def __init__(self, settings: CirisSettings) -> None:
        self._settings = settings
        self._urls = settings.base_urls
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if not self._settings.id_token_mode and self._settings.api_key is not None:
            headers["X-API-Key"] = self._settings.api_key.get_secret_value()
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        idempotent: bool,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        deadline: float | None = None,
        bearer: str | None = None,
    ) -> Reply:
        """One logical call, finished by `deadline` (loop time; default: now + `timeout_seconds`),
        authenticated with `bearer` (the user's ID token) when given, else the session's API key.
        Returns any non-transient reply; raises `BackendUnavailable` (or `IdTokenRefused`) otherwise."""
        auth = None if bearer is None else {"Authorization": f"Bearer {bearer}"}
        if self._session is None:
            raise BackendUnavailable("provider not started", maybe_applied=False)
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._settings.timeout_seconds
        attempts = 1 + (self._settings.max_retries if idempotent else len(self._urls) - 1)
        reason = "no attempt made"
        maybe_applied = False
        for attempt in range(attempts):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            base = self._urls[attempt % len(self._urls)]
            try:
                reply = await self._once(method, base + path, json_body, params, remaining, auth)
            except _Transient as exc:
                reason = exc.reason
                maybe_applied = maybe_applied or exc.sent
                if not idempotent and exc.sent:
                    break
                logger.debug("Billing backend %s attempt %d failed: %s", endpoint, attempt + 1, reason)
                delay = min(self._settings.backoff_seconds * 2**attempt, max(deadline - loop.time(), 0))
                if attempt + 1 < attempts and delay > 0 and idempotent:
                    await asyncio.sleep(delay)
                continue
            if reply.status == 401 and auth is not None:
                logger.info("Billing backend refused the user's ID token on %s", endpoint)
                raise IdTokenRefused
            if reply.status == 401 or (reply.status == 403 and reply.detail.startswith("Missing required")):
                logger.error(
                    "CIRIS Billing rejected the API key (HTTP %d on %s); check CIRIS_BILLING_API_KEY",
                    reply.status,
                    endpoint,
                )
                raise KeyRejected(f"API key rejected (HTTP {reply.status})")
            return reply
        logger.warning("Billing backend %s unavailable: %s", endpoint, reason)
        raise BackendUnavailable(reason, maybe_applied=maybe_applied)

    async def probe(self, path: str, seconds: float) -> int:
        """The status of one GET of `path` (API key auth) on the first backend URL within `seconds`:
        never retried, never logged (the readiness check runs it as often as it is asked).
        `BackendUnavailable` without a usable answer."""
        if self._session is None:
            raise BackendUnavailable("provider not started", maybe_applied=False)
        try:
            reply = await self._once("GET", self._urls[0] + path, None, None, seconds, None)
        except _Transient as exc:
            raise BackendUnavailable(exc.reason, maybe_applied=False) from None
        return reply.status

    async def _once(
        self,
        method: str,
        url: str,
        json_body: dict[str, Any] | None,
        params: dict[str, str] | None,
        remaining: float,
        auth: dict[str, str] | None,
    ) -> Reply:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(
            total=remaining, connect=min(self._settings.connect_timeout_seconds, remaining)
        )
        try:
            async with self._session.request(
                method,
                url,
                json=json_body,
                params=params,
                headers=auth,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                # Lower-cased: the backend's server (uvicorn) sends header names in lower case.
                headers = {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith("x-")}
                is_json = resp.content_type == "application/json"
        except aiohttp.ClientConnectorError as exc:
            raise _Transient(f"cannot connect ({type(exc).__name__})", sent=False) from None
        except TimeoutError:
            raise _Transient("timeout") from None
        except aiohttp.ClientError as exc:
            raise _Transient(f"connection error ({type(exc).__name__})") from None
        if status >= 500 or status == 429:
            raise _Transient(f"HTTP {status}{_detail_hint(raw, is_json)}")
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                if 200 <= status < 300 or is_json:
                    raise _Transient(f"malformed JSON (HTTP {status})") from None
        if 200 <= status < 300 and not isinstance(body, dict):
            raise _Transient(f"unexpected body (HTTP {status})")
        return Reply(status, body, headers)


def _detail_hint(raw: bytes, is_json: bool) -> str:
    """The backend's own short error text (e.g. "Payment provider not configured"), to tell a
    Stripe outage from a rate limit in the log. Only a JSON string detail: never a raw body."""
    if not is_json:
        return ""
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        return ""
    return f" ({detail})" if isinstance(detail, str) and len(detail) <= 80 else ""
