"""The billing backend's endpoints as typed calls, each as `docs/billing-backend.md` describes it.

  POST /v1/billing/credits/check        credit status (and account creation) for one identity
  POST /v1/billing/charges              one use per gated interaction (`amount_minor: 1`, USD)
  POST /v1/billing/credits              a `refund` credit when a gated interaction failed
  POST /v1/billing/purchases            start a Stripe purchase (never retried blindly)
  GET  /v1/billing/purchases/{id}/status     Stripe's status of a payment this agent started
  GET  /v1/billing/transactions         the account's charges and credits, newest first
  POST /v1/billing/google-play/verify   redeem a Google Play purchase (idempotent per token)
  POST /v1/billing/apple-storekit/verify     redeem an App Store transaction (the same)

In `id_token` mode the credit check and the verifications go with the user's ID token of the
request being served (`current_id_token()`) instead of the API key; the backend takes nothing else
that way.

Every failure to get an answer leaves here as `ProviderUnavailable`; answers are returned for the
caller to judge, except a credit check, which is always parsed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from ...errors import IdTokenRequired, ProviderUnavailable
from ...id_token import MISSING, REFUSED, current_id_token
from ...identity import Identity
from .accounts import BackendAccounts
from .settings import CirisSettings
from .transport import BackendUnavailable, IdTokenRefused, Reply, Transport
from .wire import BackendCredit

logger = logging.getLogger("ciris_billing_proxy.ciris")

#: What the readiness check reads with the API key: an account no agent creates (the backend answers
#: 404 when the key is good).
HEALTH_PROBE_PATH = "/v1/billing/accounts/ciris-billing-proxy-health/probe"


class BillingBackend:
    def __init__(self, settings: CirisSettings, accounts: BackendAccounts) -> None:
        self.settings = settings
        self.accounts = accounts
        self.transport = Transport(settings)
        #: Set once a backend from before the transactions listing existed (Nov 2025) is seen.
        self.listing_missing = False
        #: Told when the backend refuses the agent's own ID token (not one a request sent).
        self.on_agent_token_refused: Callable[[], None] | None = None

    async def start(self) -> None:
        await self.transport.start()

    async def stop(self) -> None:
        await self.transport.stop()

    async def health(self, seconds: float) -> str | None:
        """None when the backend answers and, with an API key, accepts it; else why not. With the
        key: a read of an account that does not exist (404 with a good key, 401/403 with a bad
        one, nothing written); in `id_token` mode, which has no key: `GET /health`."""
        path = "/health" if self.settings.id_token_mode else HEALTH_PROBE_PATH
        try:
            status = await self.transport.probe(path, seconds)
        except BackendUnavailable as exc:
            return f"backend unavailable: {exc.reason}"
        if status in (401, 403):
            return f"backend refused the API key (HTTP {status})"
        if status >= 400 and not (status == 404 and path == HEALTH_PROBE_PATH):
            return f"backend answered HTTP {status}"
        return None

    def deadline(self, seconds: float) -> float:
        """One budget for a whole operation: every call it makes shares what is left of it."""
        return asyncio.get_running_loop().time() + seconds

    def unexpected(self, endpoint: str, reply: Reply) -> ProviderUnavailable:
        logger.error("Billing backend %s answered HTTP %d unexpectedly", endpoint, reply.status)
        # A definite answer (not a timeout): whatever it was, the backend did not apply the call.
        return ProviderUnavailable(f"unexpected HTTP {reply.status} from {endpoint}", maybe_applied=False)

    async def _call(self, method: str, path: str, *, as_user: bool = False, **kwargs: Any) -> Reply:
        """`as_user`: the call may go with the user's ID token (the endpoints that take one)."""
        bearer = self._id_token() if as_user and self.settings.id_token_mode else None
        try:
            return await self.transport.call(method, path, bearer=bearer, **kwargs)
        except BackendUnavailable as exc:
            raise ProviderUnavailable(exc.reason, maybe_applied=exc.maybe_applied) from None
        except IdTokenRefused:
            token = current_id_token()
            if token is not None and token.from_agent and self.on_agent_token_refused is not None:
                self.on_agent_token_refused()
            raise IdTokenRequired(REFUSED) from None

    def _id_token(self) -> str:
        token = current_id_token()
        if token is None:
            raise IdTokenRequired(MISSING)
        return token.value

    async def check(self, identity: Identity, deadline: float | None = None) -> BackendCredit:
        agent_id = self.accounts.agent_id
        reply = await self._call(
            "POST",
            "/v1/billing/credits/check",
            as_user=True,
            endpoint="credits/check",
            idempotent=True,
            json_body={**self.accounts.of(identity), "context": {"agent_id": agent_id}},
            deadline=deadline,
        )
        if reply.status != 200:
            raise self.unexpected("credits/check", reply)
        try:
            return BackendCredit.model_validate(reply.body)
        except ValidationError:
            logger.error("Billing backend credits/check answered a body that does not fit the contract")
            raise ProviderUnavailable("malformed credit check") from None

    async def charge(self, identity: Identity, request_key: str, deadline: float) -> Reply:
        agent_id = self.accounts.agent_id
        return await self._call(
            "POST",
            "/v1/billing/charges",
            endpoint="charges",
            idempotent=True,  # the deterministic idempotency key makes a retry safe
            json_body={
                **self.accounts.of(identity),
                "amount_minor": 1,
                "currency": "USD",
                # The request key in the description too: transaction listings always carry the
                # description, while their metadata is optional.
                "description": f"Agent interaction {request_key}",
                "idempotency_key": self.accounts.key("charge", identity, request_key),
                "metadata": {"agent_id": agent_id, "request_id": request_key},
            },
            deadline=deadline,
        )

    async def refund(self, identity: Identity, request_key: str) -> Reply:
        return await self._call(
            "POST",
            "/v1/billing/credits",
            endpoint="credits",
            idempotent=True,
            json_body={
                **self.accounts.of(identity),
                "amount_minor": 1,
                "currency": "USD",
                "description": "Refund: agent interaction failed",
                "transaction_type": "refund",
                "idempotency_key": self.accounts.key("refund", identity, request_key),
            },
        )

    async def purchase(self, body: dict[str, Any], deadline: float) -> Reply:
        return await self._call(
            "POST",
            "/v1/billing/purchases",
            endpoint="purchases",
            idempotent=False,
            json_body=body,
            deadline=deadline,
        )

    async def stripe_status(self, payment_id: str, deadline: float) -> Reply:
        return await self._call(
            "GET",
            f"/v1/billing/purchases/{quote(payment_id, safe='')}/status",
            endpoint="purchase_status",
            idempotent=True,
            deadline=deadline,
        )

    async def verify_store(self, store: str, identity: Identity, purchase: dict[str, str]) -> Reply:
        """`store` is `google-play` or `apple-storekit`. Retried like a check: the backend redeems
        each purchase once, so a repeat after a lost reply answers `already_processed`. The budget is
        the purchase one: the backend asks the store synchronously."""
        return await self._call(
            "POST",
            f"/v1/billing/{store}/verify",
            as_user=True,
            endpoint=f"{store}/verify",
            idempotent=True,
            json_body={**self.accounts.of(identity), **purchase},
            deadline=self.deadline(self.settings.purchase_timeout_seconds),
        )

    # -- tool credits (3.9; docs/tool-credits.md) ----------------------------------------------------
    async def tool_read(self, path: str, identity: Identity, endpoint: str) -> Reply:
        """`GET /v1/tools/...`: as the user (their ID token) in `id_token` mode; with the API key,
        the identity goes in the query (a guess: the public source does not show that form)."""
        params = None
        if not self.settings.id_token_mode:
            who = self.accounts.of(identity)
            params = {"oauth_provider": who["oauth_provider"], "external_id": who["external_id"]}
        return await self._call("GET", path, as_user=True, endpoint=endpoint, idempotent=True, params=params)

    async def tool_charge(self, identity: Identity, product: str, request_key: str) -> Reply:
        """One use of `product`; a repeated idempotency key answers the first charge again."""
        who = self.accounts.of(identity)
        return await self._call(
            "POST",
            "/v1/tools/charge",
            endpoint="tools/charge",
            idempotent=True,
            json_body={
                "product_type": product,
                "oauth_provider": who["oauth_provider"],
                "external_id": who["external_id"],
                "idempotency_key": self.accounts.key(f"tool-{product}", identity, request_key),
                "request_id": request_key,
            },
        )

    async def tool_purchase(self, identity: Identity, purchase: dict[str, str]) -> Reply:
        """`POST /v1/tools/purchase/verify`, as the CIRIS agent sends it (with the API key, the
        identity in the body). Retried like a store verification: a repeat is a 409, nothing added."""
        body: dict[str, Any] = dict(purchase)
        if not self.settings.id_token_mode:
            who = self.accounts.of(identity)
            body |= {"oauth_provider": who["oauth_provider"], "external_id": who["external_id"]}
        return await self._call(
            "POST",
            "/v1/tools/purchase/verify",
            as_user=True,
            endpoint="tools/purchase/verify",
            idempotent=True,
            json_body=body,
            deadline=self.deadline(self.settings.purchase_timeout_seconds),
        )

    async def transactions(
        self, identity: Identity, limit: int, offset: int, deadline: float | None = None
    ) -> Reply:
        who = self.accounts.of(identity)
        reply = await self._call(
            "GET",
            "/v1/billing/transactions",
            endpoint="transactions",
            idempotent=True,
            params={
                "oauth_provider": who["oauth_provider"],
                "external_id": who["external_id"],
                "limit": str(limit),
                "offset": str(offset),
            },
            deadline=deadline,
        )
        if reply.status == 404:
            self.listing_missing = True
        return reply

    async def find_transaction(
        self,
        identity: Identity,
        kind: str,
        match: Callable[[dict[str, Any]], bool],
        *,
        deadline: float | None = None,
    ) -> dict[str, Any] | None:
        """The first of the user's 100 newest transactions of this kind that matches, if any (None
        also from a backend without the listing: see `listing_missing`)."""
        reply = await self.transactions(identity, 100, 0, deadline)
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise self.unexpected("transactions", reply)
        items = reply.body.get("transactions")
        if not isinstance(items, list):
            return None
        for item in items:
            if isinstance(item, dict) and item.get("type") == kind and match(item):
                return item
        return None
