"""A credit provider that gives every user N uses per UTC day, kept in memory.

It shows the whole provider contract in one screen: settings from options or the environment,
an atomic spend that raises `InsufficientCredit`, an idempotent give-back, and a `CreditStatus`
that keeps the consistency rules. Purchases stay disabled (the base class answers 403 for them).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Self

from cachetools import TTLCache
from pydantic import BaseModel, ConfigDict, Field

from ciris_billing_proxy import CreditProvider, CreditStatus, Identity, InsufficientCredit, ProviderContext


class QuotaSettings(BaseModel):
    """`provider_options` (or `serve --provider-option per_day=N`), else `ACME_USES_PER_DAY`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_day: int = Field(default=5, ge=0, le=1_000_000)


class DailyQuotaProvider(CreditProvider):
    name = "daily-quota"

    def __init__(self, per_day: int) -> None:
        self.per_day = per_day
        self._used: dict[tuple[tuple[str, str], str], int] = {}  # (identity key, UTC day) -> uses
        # (identity key, idempotency key) -> the day it was spent on. Keyed per user too, so one user's
        # key never takes or gives back another's use; keys older than two days can no longer be given back.
        self._spent: TTLCache[tuple[tuple[str, str], str], tuple[tuple[str, str], str]] = TTLCache(
            maxsize=1_000_000, ttl=2 * 86_400
        )
        self._lock = asyncio.Lock()

    @classmethod
    def from_context(cls, context: ProviderContext) -> Self:
        settings = context.settings(QuotaSettings, env={"ACME_USES_PER_DAY": "per_day"})
        return cls(settings.per_day)

    def _slot(self, identity: Identity) -> tuple[tuple[str, str], str]:
        return identity.key, datetime.now(UTC).date().isoformat()

    async def credit_status(self, identity: Identity) -> CreditStatus:
        left = max(self.per_day - self._used.get(self._slot(identity), 0), 0)
        return CreditStatus(
            has_credit=left > 0,
            credits_remaining=0,
            free_uses_remaining=left,
            total_uses=self._used.get(self._slot(identity), 0),
            plan_name="daily",
            purchase_required=False,
            purchase_options=None,
            reason=None if left else "Daily quota used up; it resets at 00:00 UTC",
        )

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        async with self._lock:
            if (identity.key, idempotency_key) in self._spent:
                return
            slot = self._slot(identity)
            if self._used.get(slot, 0) >= self.per_day:
                raise InsufficientCredit("Daily quota used up; it resets at 00:00 UTC")
            self._used[slot] = self._used.get(slot, 0) + 1
            self._spent[(identity.key, idempotency_key)] = slot

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        async with self._lock:
            slot = self._spent.pop((identity.key, idempotency_key), None)
            if slot is not None:
                self._used[slot] -= 1
