"""The credit ledger's routes under the billing prefix (docs/credits.md):

* `GET /usage`: the caller's spends totalled per day, model or product;
* `GET /admin/users/{user_id}/credits`, `POST /admin/users/{user_id}/grants`, `GET /admin/audit`:
  for roles in `admin_roles` only (403 for every other), to see a user's grants, grant or take
  back credit with a reason, and read the journal of every change (who, why, when).

They serve a provider that keeps its credit on the ledger (`CreditProvider.credit_ledger`); for
any other the answer is 404. Each grant or correction is also an audit event (`credit_adjusted`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from .bodies import read_model
from .credit_models import (
    AdminBalance,
    AdminCredits,
    AdminGrantReply,
    AdminGrantRequest,
    AuditPage,
    GrantInfo,
    JournalLine,
    UsageGroup,
    UsageReport,
)
from .errors import http_error
from .identity import Identity
from .keys import VERIFIED_KEY
from .ledger import ENTRY_KINDS, Account, KeyReused, Ledger, Overdrawn, iso
from .operations import BEARER_ERRORS, BODY_ERRORS, PROVIDER_FAILED, IntQuery, Operation, TextParam, TextQuery
from .ops.audit import AuditKind, user_of
from .paths import ADMIN_ROUTE, USAGE_ROUTE
from .service import BillingService

NO_LEDGER: Final = "Not offered by this agent's credit provider"
NOT_ADMIN: Final = "This route is for administrators"
NO_RECORDS: Final = "No credit records for this user"
OVERDRAWN: Final = "Correction refused: it would take the balance below zero (balance {balance})"
KEY_REUSED: Final = "Idempotency-Key was used for another change of this user's credit"
#: How far back `GET /usage` looks without a `from`.
DEFAULT_USAGE_DAYS: Final = 30

#: A UTC day, `YYYY-MM-DD`: usage and the journal are read by the day.
_DAY: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
SINCE: Final = TextQuery("from", _DAY, "First UTC day (YYYY-MM-DD); default 30 days before `to`.", "date")
UNTIL: Final = TextQuery("to", _DAY, "The UTC day the range ends before (YYYY-MM-DD); default now.", "date")
GROUP_BY: Final = TextQuery(
    "group_by", re.compile("day|model|product"), "`day` (default), `model` or `product`."
)
USER_ID: Final = TextParam("user_id", re.compile(r"[^/]{1,256}"), "The user's id (a token's `sub`).")
NAMESPACE: Final = TextQuery(
    "namespace",
    re.compile(r"[^\s]{1,64}"),
    "The user's identity namespace (default: the agent's `identity_namespace`, e.g. `local`).",
)
AUDIT_USER: Final = TextQuery("user_id", re.compile(r".{1,256}"), "Only this user's lines.")
AUDIT_SINCE: Final = TextQuery("since", _DAY, "Only lines from this UTC day on (YYYY-MM-DD).", "date")
AUDIT_KIND: Final = TextQuery(
    "kind", re.compile("|".join(ENTRY_KINDS)), "Only lines of this kind: " + ", ".join(ENTRY_KINDS) + "."
)
LIMIT: Final = IntQuery("limit", 50, 1, 100, "Lines per page.")
OFFSET: Final = IntQuery("offset", 0, 0, 1_000_000_000, "Lines to skip, newest first.")
GRANT_KEY: Final = TextParam(
    "Idempotency-Key",
    re.compile(r"[A-Za-z0-9_\-.:]{1,128}"),
    "Repeating the request with the same key (per user) changes nothing and answers what the first did.",
)
ADMIN_ERRORS: Final = {**BEARER_ERRORS, 403: NOT_ADMIN, 404: NO_LEDGER, 503: PROVIDER_FAILED}

USAGE: Final = Operation(
    "getUsage",
    "GET",
    USAGE_ROUTE,
    "Where the caller's credits went: spends totalled per day, model or product over a time range.",
    UsageReport,
    {
        **BEARER_ERRORS,
        404: NO_LEDGER,
        422: "`from`, `to` or `group_by` not valid (a range that ends before it starts is empty: no totals)",
        503: PROVIDER_FAILED,
    },
    "credits",
    query=(SINCE, UNTIL, GROUP_BY),
)
USER_CREDITS: Final = Operation(
    "getUserCredits",
    "GET",
    ADMIN_ROUTE + "/users/{user_id}/credits",
    "Admin: a user's balance as of now and every grant (kind, amount, remaining, expiry, reason, who).",
    AdminCredits,
    {**ADMIN_ERRORS, 404: f"{NO_LEDGER}; or the ledger has no record of this user", 422: "bad `namespace`"},
    "admin",
    path_params=(USER_ID,),
    query=(NAMESPACE,),
)
USER_GRANT: Final = Operation(
    "grantUserCredit",
    "POST",
    ADMIN_ROUTE + "/users/{user_id}/grants",
    "Admin: grant credit to a user (`amount` > 0), or take it back (`amount` < 0), with a reason code; "
    "kept in the journal with who, why and when.",
    AdminGrantReply,
    {
        **ADMIN_ERRORS,
        **BODY_ERRORS,
        400: "the body is not JSON, or a bad `Idempotency-Key`",
        409: "a correction larger than the balance (refused: nothing taken), or an `Idempotency-Key` "
        "used for another change",
        422: "the body is not a grant or correction of the documented shape, or a bad `namespace`",
    },
    "admin",
    body=AdminGrantRequest,
    body_required=True,
    path_params=(USER_ID,),
    query=(NAMESPACE,),
    headers=(GRANT_KEY,),
)
AUDIT: Final = Operation(
    "getCreditAudit",
    "GET",
    ADMIN_ROUTE + "/audit",
    "Admin: the journal of every change of credit (grants, corrections, spends, give-backs, expiries), "
    "newest first, a page at a time.",
    AuditPage,
    {**ADMIN_ERRORS, 422: "a query parameter out of range or not valid"},
    "admin",
    query=(AUDIT_USER, NAMESPACE, AUDIT_SINCE, AUDIT_KIND, LIMIT, OFFSET),
)
CREDIT_OPERATIONS: Final = (USAGE, USER_CREDITS, USER_GRANT, AUDIT)


class CreditRoutes:
    def __init__(self, service: BillingService) -> None:
        self.service = service

    def _ledger(self) -> Ledger:
        ledger = self.service.provider.credit_ledger
        if ledger is None:
            raise http_error(404, NO_LEDGER)
        return ledger

    def _admin(self, request: web.Request) -> tuple[Identity, Ledger]:
        """The caller, if an admin, and the ledger: 403 before anything else is looked at."""
        caller: Identity = request[VERIFIED_KEY][1]
        if caller.role not in self.service.config.admin_roles:
            self.service.audit.record(
                AuditKind.ADMIN_REFUSED,
                user_of(caller),
                "refused",
                reference=f"{request.method} {request.path}",
            )
            raise http_error(403, NOT_ADMIN)
        return caller, self._ledger()

    def _account(self, request: web.Request) -> Account:
        user_id = request.match_info["user_id"]
        if not USER_ID.matches(user_id):
            raise http_error(422, "Invalid request: user_id is not valid")
        return Account(NAMESPACE.read(request) or self.service.config.identity_namespace, user_id)

    async def usage(self, request: web.Request) -> web.Response:
        ledger = self._ledger()
        identity: Identity = request[VERIFIED_KEY][1]
        until = _instant(UNTIL, request) or datetime.fromtimestamp(ledger.clock(), UTC)
        since = _instant(SINCE, request) or until - timedelta(days=DEFAULT_USAGE_DAYS)
        group_by = GROUP_BY.read(request) or "day"
        low, high = iso(since.timestamp()), iso(until.timestamp())
        totals = await ledger.usage_totals(identity.namespace, identity.user_id, low, high, group_by)
        report = UsageReport(
            since=since.isoformat(),
            until=until.isoformat(),
            group_by=group_by,  # type: ignore[arg-type]
            totals=[UsageGroup.of(t) for t in totals],
        )
        return _json(report)

    async def user_credits(self, request: web.Request) -> web.Response:
        _, ledger = self._admin(request)
        account = self._account(request)
        balance = await ledger.balance(account)
        grants = await ledger.grants(account)
        if not grants and not balance.used:
            raise http_error(404, NO_RECORDS)
        now = ledger.clock()
        reply = AdminCredits(
            user_id=account.user_id,
            namespace=account.namespace,
            balance=AdminBalance.of(balance),
            grants=[GrantInfo.of(g, now) for g in grants],
        )
        return _json(reply)

    async def grant(self, request: web.Request) -> web.Response:
        caller, ledger = self._admin(request)
        account = self._account(request)
        key = request.headers.get(GRANT_KEY.name)
        if key is not None and not GRANT_KEY.matches(key):
            raise http_error(400, "Idempotency-Key must be 1-128 letters, digits or -_.:")
        config = self.service.config
        change = await read_model(
            request, AdminGrantRequest, config.max_body_bytes, time_limit=config.body_timeout_seconds
        )
        expiry = change.expiry()
        if expiry is not None and expiry <= ledger.clock():
            raise http_error(422, "Invalid request: expires_at must be in the future")
        try:
            reply = await change_credit(ledger, account, change, actor=user_of(caller), key=key)
        except Overdrawn as exc:
            raise http_error(409, OVERDRAWN.format(balance=exc.balance)) from None
        except KeyReused:
            raise http_error(409, KEY_REUSED) from None
        if not reply.replayed:
            self.service.invalidate(Identity(account.user_id, account.namespace, caller.role))
            self.service.audit.record(
                AuditKind.CREDIT_ADJUSTED,
                f"{account.namespace}:{account.user_id}",
                change.reason,
                amount=reply.amount,
                reference=f"by {user_of(caller)}",
            )
        return _json(reply)

    async def audit(self, request: web.Request) -> web.Response:
        _, ledger = self._admin(request)
        user_id = AUDIT_USER.read(request)
        namespace = NAMESPACE.read(request)
        if namespace is None and user_id is not None:
            namespace = self.service.config.identity_namespace
        since = _instant(AUDIT_SINCE, request)
        limit, offset = LIMIT.read(request), OFFSET.read(request)
        entries, total = await ledger.journal(
            namespace=namespace
            if namespace is not None or user_id is None
            else self.service.config.identity_namespace,
            user_id=user_id,
            since=None if since is None else iso(since.timestamp()),
            kind=AUDIT_KIND.read(request),
            limit=limit,
            offset=offset,
        )
        page = AuditPage(
            entries=[JournalLine.of(e) for e in entries],
            total_count=total,
            has_more=offset + len(entries) < total,
        )
        return _json(page)


async def change_credit(
    ledger: Ledger, account: Account, change: AdminGrantRequest, *, actor: str, key: str | None
) -> AdminGrantReply:
    """Apply an admin's grant or correction (the HTTP route's and the command line's): `Overdrawn`
    for a correction beyond the balance, `KeyReused` for a key used for another change."""
    now = ledger.clock()
    if change.amount > 0:
        granted = await ledger.grant(
            account,
            change.amount,
            change.kind or "promotional",
            source="admin",
            reason=change.reason,
            note=change.note,
            actor=actor,
            expires_at=change.expiry(),
            key=key,
        )
        return AdminGrantReply(
            amount=granted.grant.amount,
            grant=GrantInfo.of(granted.grant, now),
            grant_ids=[granted.grant.id],
            balance=AdminBalance.of(granted.balance),
            replayed=granted.replayed,
        )
    clawed = await ledger.claw_back(
        account,
        -change.amount,
        reason=change.reason,
        note=change.note,
        actor=actor,
        kind=change.kind,
        key=key,
    )
    return AdminGrantReply(
        amount=-clawed.taken,
        grant=None,
        grant_ids=list(clawed.grant_ids),
        balance=AdminBalance.of(clawed.balance),
        replayed=clawed.replayed,
    )


def _instant(param: TextQuery, request: web.Request) -> datetime | None:
    """A day parameter as the moment it starts (UTC)."""
    raw = param.read(request)
    if raw is None:
        return None
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise http_error(422, f"Invalid request: {param.name} is not a date (YYYY-MM-DD)") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _json(model: CreditModel) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), content_type="application/json")


CreditModel = UsageReport | AdminCredits | AdminGrantReply | AuditPage


def add_credit_routes(
    router: web.UrlDispatcher,
    service: BillingService,
    prefix: str,
    expect: Callable[[web.Request], Awaitable[None]],
    guard: Callable[[Handler], Handler],
) -> list[web.AbstractRoute]:
    """Add the routes to `router` under `prefix`, each handler through `guard` (see
    `routes.add_routes`)."""
    routes = CreditRoutes(service)
    handler_of = {
        USAGE: routes.usage,
        USER_CREDITS: routes.user_credits,
        USER_GRANT: routes.grant,
        AUDIT: routes.audit,
    }
    return [
        router.add_route(op.method, prefix + op.path, guard(handler_of[op]), expect_handler=expect)
        for op in CREDIT_OPERATIONS
    ]
