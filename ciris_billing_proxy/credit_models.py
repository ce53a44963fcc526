"""Wire models of the credit ledger's routes: `GET {prefix}/usage` and the admin routes under
`{prefix}/admin/` (docs/credits.md). Replies are built from the ledger's records
(`ciris_billing_proxy.ledger`) by the `of` class methods, so a field cannot drift from its source."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .ledger import REASONS, Balance, Entry, Grant, UsageTotal
from .ledger.model import MAX_AMOUNT


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


def unix_to_iso(at: int | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat()


def parse_instant(value: str) -> datetime:
    """An ISO 8601 date or date-time; one without a zone is UTC. `ValueError` otherwise."""
    if len(value) > 40:
        raise ValueError("is too long for a date-time")
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class UsageGroup(_Reply):
    """One group of `GET /usage`: spends in it (given-back ones not counted), the credit they
    took, and the tokens their handlers reported."""

    key: str
    spends: int = Field(ge=0)
    credits: int = Field(ge=0)
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)

    @classmethod
    def of(cls, total: UsageTotal) -> Self:
        return cls(
            key=total.key,
            spends=total.spends,
            credits=total.credits,
            input_tokens=total.input_tokens,
            output_tokens=total.output_tokens,
        )


class UsageReport(_Reply):
    """`GET /usage`: the caller's totals over [`since`, `until`), per `group_by` (`day`: the UTC
    date; `model`: as the handler named it, "" for none; `product`: "" for interactions, else the
    tool's name)."""

    since: str
    until: str
    group_by: Literal["day", "model", "product"]
    totals: list[UsageGroup]


class GrantInfo(_Reply):
    """A grant as the admin routes show it."""

    grant_id: int
    kind: Literal["free", "promotional", "paid"]
    source: Literal["purchase", "admin", "signup", "store"]
    amount: int = Field(ge=1)
    remaining: int = Field(ge=0)
    #: ISO 8601, UTC; None when it never expires.
    expires_at: str | None
    expired: bool
    reason: str
    note: str | None
    #: Who granted it (`namespace:user_id` of an admin; `cli:NAME` from the command line).
    actor: str | None
    created_at: str

    @classmethod
    def of(cls, grant: Grant, now: float) -> Self:
        return cls(
            grant_id=grant.id,
            kind=grant.kind,  # type: ignore[arg-type]
            source=grant.source,  # type: ignore[arg-type]
            amount=grant.amount,
            remaining=grant.remaining,
            expires_at=unix_to_iso(grant.expires_at),
            expired=grant.expires_at is not None and grant.expires_at <= now,
            reason=grant.reason,
            note=grant.note,
            actor=grant.actor,
            created_at=grant.created_at,
        )


class AdminBalance(_Reply):
    free_uses_remaining: int = Field(ge=0)
    credits_remaining: int = Field(ge=0)
    total_uses: int = Field(ge=0)
    next_expiry_at: str | None

    @classmethod
    def of(cls, balance: Balance) -> Self:
        return cls(
            free_uses_remaining=balance.free,
            credits_remaining=balance.credits,
            total_uses=balance.used,
            next_expiry_at=unix_to_iso(balance.soonest_expiry),
        )


class AdminCredits(_Reply):
    """`GET admin/users/{user_id}/credits`: the balance as of now and every grant, newest first."""

    user_id: str
    namespace: str
    balance: AdminBalance
    grants: list[GrantInfo]


class AdminGrantRequest(_Request):
    """`POST admin/users/{user_id}/grants`: a grant (`amount` > 0) or a correction that takes
    credit back (`amount` < 0: from grants of `kind` when given, what would be spent last first;
    refused with 409 when the balance is smaller)."""

    amount: int = Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT)
    #: A grant's kind (default `promotional`); for a correction, the only kind taken from.
    kind: Literal["free", "promotional", "paid"] | None = None
    #: Why: one of the reason codes of docs/credits.md.
    reason: str = Field(json_schema_extra={"enum": list(REASONS)})
    note: str | None = Field(default=None, min_length=1, max_length=500)
    #: When the grant expires (ISO 8601; without a zone, UTC); in the future. Grants only.
    expires_at: str | None = Field(default=None, min_length=10, max_length=40)

    @field_validator("amount")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must not be 0")
        return value

    @field_validator("reason")
    @classmethod
    def _known_reason(cls, value: str) -> str:
        if value not in REASONS:
            raise ValueError("must be one of the reason codes: " + ", ".join(REASONS))
        return value

    @field_validator("expires_at")
    @classmethod
    def _instant(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_instant(value)
            except ValueError:
                raise ValueError("must be an ISO 8601 date-time") from None
        return value

    @model_validator(mode="after")
    def _grant_only(self) -> Self:
        if self.amount < 0 and self.expires_at is not None:
            raise ValueError("expires_at is for grants (a positive amount)")
        return self

    def expiry(self) -> int | None:
        """`expires_at` as Unix seconds (a fraction of a second is dropped)."""
        return None if self.expires_at is None else int(parse_instant(self.expires_at).timestamp())


class AdminGrantReply(_Reply):
    """What a grant or correction did: the credit it added (positive) or took (negative), the
    grant made, the grants taken from, and the balance after it. `replayed`: an earlier request
    with this `Idempotency-Key` did it, and this one changed nothing."""

    amount: int
    grant: GrantInfo | None
    grant_ids: list[int]
    balance: AdminBalance
    replayed: bool


class JournalLine(_Reply):
    """One movement of credit, with who, why and when."""

    id: int
    namespace: str
    user_id: str
    #: "" for interaction credits, else the tool's name.
    product: str
    kind: Literal["grant", "clawback", "spend", "give_back", "reserve", "settle", "expire"]
    amount: int
    balance_after: int | None
    grant_id: int | None
    reason: str | None
    note: str | None
    actor: str | None
    created_at: str
    usage: dict[str, Any] | None

    @classmethod
    def of(cls, entry: Entry) -> Self:
        return cls(
            id=entry.id,
            namespace=entry.namespace,
            user_id=entry.user_id,
            product=entry.product,
            kind=entry.kind,  # type: ignore[arg-type]
            amount=entry.amount,
            balance_after=entry.balance_after,
            grant_id=entry.grant_id,
            reason=entry.reason,
            note=entry.note,
            actor=entry.actor,
            created_at=entry.created_at,
            usage=None if entry.usage is None else entry.usage.model_dump(exclude_none=True),
        )


class AuditPage(_Reply):
    """`GET admin/audit`: journal lines, newest first, a page at a time."""

    entries: list[JournalLine]
    total_count: int = Field(ge=0)
    has_more: bool
