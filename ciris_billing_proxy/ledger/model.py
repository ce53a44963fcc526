"""What the ledger keeps and answers, and the rules every engine applies the same way.

Spending order (`spending_order`): a spend takes from the account's live grants (remaining above
zero, not expired) in this order:

1. `free` grants before any other kind;
2. then grants that expire before grants that never do, the soonest expiry first;
3. among grants of equal expiry (or none): `free`, then `promotional`, then `paid`;
4. and among those the oldest grant (the lowest id) first.

So a free grant that expires tomorrow goes before one that expires next year, a promotional grant
that expires goes before any paid credit, and paid credit without an expiry is taken last. A
reservation takes the same way; what it releases goes back in the reverse order (the grants taken
last get theirs back first), so the part it kept is the part a spend of that size would have taken.

Expiry: a grant with `expires_at` T (Unix seconds) counts while the clock reads less than T and not
from T on; balances are computed as of the ledger's clock at each call, so no job is needed for them
to be exact. `expire_due` only announces expiries (`credit.expired`, once per grant).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The kinds of grant: `free` counts in `free_uses_remaining`, the others in `credits_remaining`.
GrantKind = Literal["free", "promotional", "paid"]
GRANT_KINDS: Final = ("free", "promotional", "paid")
#: Where a grant came from.
GrantSource = Literal["purchase", "admin", "signup", "store"]
GRANT_SOURCES: Final = ("purchase", "admin", "signup", "store")
#: Reason codes of grants and corrections (docs/credits.md), so reports can group them.
REASONS: Final = {
    "signup": "the free uses every user gets on first sight",
    "purchase": "credit bought (Stripe, the CIRIS backend)",
    "store": "credit bought in an app store",
    "goodwill": "a gift from support (an apology, a thank-you)",
    "promotion": "a campaign or promotional code",
    "compensation": "made good for an outage or a failed service",
    "correction": "a mistake in the balance put right (either way)",
    "refund": "credit taken back because its payment was refunded",
    "chargeback": "credit taken back because its payment was disputed",
    "fraud": "credit taken back after abuse",
    "migration": "credit carried over from another system",
}
#: The journal's entry kinds (`Entry.kind`; the admin audit's `kind` filter).
ENTRY_KINDS: Final = ("grant", "clawback", "spend", "give_back", "reserve", "settle", "expire")
#: Largest single grant, correction or spend.
MAX_AMOUNT: Final = 1_000_000_000
#: Largest usage metadata, as compact JSON.
MAX_METADATA_BYTES: Final = 2048
USAGE_GROUPS: Final = ("day", "model", "product")


@dataclass(frozen=True, slots=True)
class Account:
    """Whose credit: an identity (`namespace`, `user_id`), and a product ("" for the interaction
    credits, a tool name for that tool's own credits)."""

    namespace: str
    user_id: str
    product: str = ""


class Balance(NamedTuple):
    """An account's credit as of one moment: live `free` grants, live `paid` + `promotional` grants,
    the uses spent in all (net of give-backs), and the soonest expiry of a live grant (Unix seconds).
    (A named tuple: providers key their built statuses on it, and its hash is C's.)"""

    free: int
    credits: int
    used: int
    soonest_expiry: int | None = None

    @property
    def total(self) -> int:
        return self.free + self.credits


@dataclass(frozen=True, slots=True)
class Grant:
    id: int
    kind: str
    source: str
    amount: int
    remaining: int
    expires_at: int | None
    reason: str
    note: str | None
    actor: str | None
    created_at: str


@dataclass(frozen=True, slots=True)
class Granted:
    """What `grant` did: the grant (the earlier one when its key was used before) and the balance."""

    grant: Grant
    balance: Balance
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class ClawedBack:
    """What `claw_back` did: how much it took, from which grants, and the balance after."""

    taken: int
    grant_ids: tuple[int, ...]
    balance: Balance
    replayed: bool = False


class Usage(BaseModel):
    """What a spend was for, attached by the handler: validated, size-limited."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str | None = Field(default=None, min_length=1, max_length=100)
    input_tokens: int | None = Field(default=None, ge=0, le=MAX_AMOUNT)
    output_tokens: int | None = Field(default=None, ge=0, le=MAX_AMOUNT)
    tool: str | None = Field(default=None, min_length=1, max_length=100)
    #: Any small JSON object (at most `MAX_METADATA_BYTES` as compact JSON).
    metadata: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(compact(value).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value

    def metadata_json(self) -> str | None:
        return None if self.metadata is None else compact(self.metadata)


def compact(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of an account's journal: every movement of credit, with who, why and when.

    `amount` is signed (a spend negative, a grant positive); `balance_after` is the account's
    balance right after it (None for lines carried over from the usage ledger before grants)."""

    id: int
    namespace: str
    user_id: str
    product: str
    kind: str
    amount: int
    balance_after: int | None
    used_after: int
    grant_id: int | None
    reason: str | None
    note: str | None
    actor: str | None
    created_at: str
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """One group of `usage_totals`: spends settled in it, credits they took, tokens they said."""

    key: str
    spends: int
    credits: int
    input_tokens: int
    output_tokens: int


#: A live grant as a spend sees it: (id, kind, remaining, expires_at). A plain tuple, as the
#: database returns it: a spend handles a few of them on the hot path.
Live = tuple[int, str, int, "int | None"]
_KIND_RANK: Final = {kind: rank for rank, kind in enumerate(GRANT_KINDS)}


def spending_order(grant: Live) -> tuple[int, int, int, int, int]:
    """The sort key of the spending order (module docstring)."""
    grant_id, kind, _, expires_at = grant
    return (
        0 if kind == "free" else 1,
        0 if expires_at is not None else 1,
        expires_at or 0,
        _KIND_RANK[kind],
        grant_id,
    )


def allocate(grants: Sequence[Live], cost: int) -> list[tuple[int, int]]:
    """(grant id, amount) taken for `cost` in spending order; the caller checked there is enough."""
    if len(grants) == 1:
        return [(grants[0][0], cost)]
    return _take_in(sorted(grants, key=spending_order), cost)


def balance_of(grants: Sequence[Live], used: int) -> Balance:
    free = credits = 0
    soonest: int | None = None
    for _, kind, remaining, expires_at in grants:
        if kind == "free":
            free += remaining
        else:
            credits += remaining
        if expires_at is not None and remaining and (soonest is None or expires_at < soonest):
            soonest = expires_at
    return Balance(free, credits, used, soonest)


def less(before: Balance, live: Sequence[Live], taken: Sequence[tuple[int, int]], cost: int) -> Balance:
    """The balance after `taken` left `live`, without reading it again."""
    if len(taken) == 1 and len(live) == 1:
        _, kind, remaining, expires_at = live[0]
        left = remaining - cost
        free = kind == "free"
        return Balance(
            before.free - cost if free else before.free,
            before.credits if free else before.credits - cost,
            before.used + cost,
            expires_at if left and expires_at is not None else None,
        )
    took = dict(taken)
    return balance_of([(g, k, r - took.get(g, 0), e) for g, k, r, e in live], before.used + cost)


def spend_events(before: int, after: int, threshold: int | None) -> list[str]:
    """The events a spend that took the balance from `before` to `after` causes: `balance.low` when
    it crosses the threshold downward (from above it to at or below it: once per crossing, since
    each spend of an account sees the balance the one before it left), `balance.exhausted` when it
    took the last of it."""
    kinds = []
    if threshold is not None and before > threshold >= after:
        kinds.append("balance.low")
    if before > 0 and after == 0:
        kinds.append("balance.exhausted")
    return kinds


def check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_AMOUNT:
        raise ValueError(f"an amount of credit is a whole number from 1 to {MAX_AMOUNT}")


def release(
    grants: Sequence[Live], taken: Sequence[tuple[int, int]], amount: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Give back `amount` of what a spend `taken` from `grants` (each as it is now): the grants
    taken last first. (grant id, amount) to return, and what the spend keeps taken after it."""
    took = dict(taken)
    ordered = sorted((g for g in grants if g[0] in took), key=spending_order, reverse=True)
    back = _take_in([(g, k, took[g], e) for g, k, _, e in ordered], amount)
    for grant_id, n in back:
        took[grant_id] -= n
    return back, [(g, n) for g, n in took.items() if n]


def claw_order(live: Sequence[Live], amount: int, grant_id: int | None) -> list[tuple[int, int]]:
    """(grant id, amount) a claw-back of `amount` takes: `grant_id` first, then what would be spent
    last first; less than `amount` when there is not that much."""
    ordered = sorted(live, key=spending_order, reverse=True)
    ordered.sort(key=lambda g: g[0] != grant_id)  # stable: the named grant first
    return _take_in(ordered, amount)


def _take_in(ordered: Sequence[Live], amount: int) -> list[tuple[int, int]]:
    taken, left = [], amount
    for grant_id, _, remaining, _ in ordered:
        n = min(remaining, left)
        if n:
            taken.append((grant_id, n))
            left -= n
    return taken


def encode_taken(taken: Sequence[tuple[int, int]]) -> str:
    """A spend's `taken`: what it took from each grant, as `id:amount,id:amount`."""
    if len(taken) == 1:
        return f"{taken[0][0]}:{taken[0][1]}"
    return ",".join(f"{grant_id}:{n}" for grant_id, n in taken if n)


def decode_taken(text: str) -> list[tuple[int, int]]:
    pairs = (part.split(":") for part in text.split(",") if part)
    return [(int(grant_id), int(n)) for grant_id, n in pairs]


def grant_of(row: Sequence[Any]) -> Grant:
    """A grant from a row of `GRANT_COLUMNS` (either engine's)."""
    return Grant(
        id=int(row[0]),
        kind=str(row[1]),
        source=str(row[2]),
        amount=int(row[3]),
        remaining=int(row[4]),
        expires_at=None if row[5] is None else int(row[5]),
        reason=str(row[6]),
        note=row[7],
        actor=row[8],
        created_at=str(row[9]),
    )


GRANT_COLUMNS: Final = "id, kind, source, amount, remaining, expires_at, reason, note, actor, created_at"
# A give-back's or settlement's line shows the usage of the spend it belongs to.
ENTRY_COLUMNS: Final = (
    "e.id, e.namespace, e.user_id, e.product, e.kind, e.amount, e.balance_after, e.used_after, "
    "e.grant_id, e.reason, e.note, e.actor, e.created_at, COALESCE(s.model, e.model), "
    "COALESCE(s.input_tokens, e.input_tokens), COALESCE(s.output_tokens, e.output_tokens), "
    "COALESCE(s.tool, e.tool), COALESCE(s.metadata, e.metadata)"
)
ENTRY_FROM: Final = "credit_entries e LEFT JOIN credit_entries s ON s.id = e.spend_id"


def entry_of(row: Sequence[Any]) -> Entry:
    """A journal line from a row of `ENTRY_COLUMNS` (either engine's)."""
    model, input_tokens, output_tokens, tool, metadata = row[13:18]
    usage = None
    if any(v is not None for v in (model, input_tokens, output_tokens, tool, metadata)):
        usage = Usage.model_construct(
            model=model,
            input_tokens=None if input_tokens is None else int(input_tokens),
            output_tokens=None if output_tokens is None else int(output_tokens),
            tool=tool,
            metadata=None if metadata is None else json.loads(metadata),
        )
    return Entry(
        id=int(row[0]),
        namespace=str(row[1]),
        user_id=str(row[2]),
        product=str(row[3]),
        kind=str(row[4]),
        amount=int(row[5]),
        balance_after=None if row[6] is None else int(row[6]),
        used_after=int(row[7]),
        grant_id=None if row[8] is None else int(row[8]),
        reason=row[9],
        note=row[10],
        actor=row[11],
        created_at=str(row[12]),
        usage=usage,
    )
