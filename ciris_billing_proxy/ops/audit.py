"""The audit trail: one event per money or auth fact, as a JSON line on the logger
`ciris_billing_proxy.audit` and, when a `database_url` is set, a row in the store.

An event has its time, kind, user (`namespace:user_id`, or the username a login was tried with),
the request id, the outcome, an amount (uses or credits) and a reference (the request key a use was
spent under, a payment id, the client address of a login): never a token, password, secret or
purchase token. Adding a kind of event is one line in `AuditKind`.

Rows are kept off the request path: `record` appends to a bounded queue that a background task
writes every `FLUSH_SECONDS` in one batch, and once more at shutdown. A failed write is retried
while the queue has room and never fails the request; what it cannot keep is counted in one
rate-limited WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from json.encoder import encode_basestring_ascii
from typing import Final

from aiohttp import web

from ..identity import Identity
from ..store.audit import AuditStore, Row
from .logs import FaultLog, RecordTemplate, UTCTimes
from .request_id import current_request_id

AUDIT_LOGGER: Final = "ciris_billing_proxy.audit"
FLUSH_SECONDS: Final = 0.1
#: Seconds between attempts while the store refuses the batch.
RETRY_SECONDS: Final = 1.0
MAX_PENDING: Final = 10_000
BATCH: Final = 500

logger = logging.getLogger("ciris_billing_proxy")
faults = FaultLog(logger)


class AuditKind(StrEnum):
    LOGIN_OK = "login_ok"
    LOGIN_FAILED = "login_failed"
    LOGIN_LOCKED = "login_locked"
    #: The password was right, but the user had their share of new tokens (429, `token_limit`).
    LOGIN_LIMITED = "login_limited"
    LOGOUT = "logout"
    #: Every token of the user ended: asked for (`{"everywhere": true}`), or past the count of
    #: revocations (`auth_routes.SessionRoutes`).
    LOGOUT_EVERYWHERE = "logout_everywhere"
    REFRESH = "refresh"
    SPEND = "spend"
    #: A reservation kept in part (`amount`: what it kept); the rest went back.
    SETTLE = "settle"
    GIVE_BACK = "give_back"
    REFUND = "refund"
    PURCHASE_INITIATED = "purchase_initiated"
    PURCHASE_SETTLED = "purchase_settled"
    PURCHASE_FAILED = "purchase_failed"
    STORE_VERIFICATION = "store_verification"
    #: A Stripe webhook (the `stripe` provider): `ok`, `duplicate`, `ignored`, `refused` (bad
    #: signature) or `failed`; the event id in `reference`.
    STRIPE_WEBHOOK = "stripe_webhook"
    #: Uses taken back after a refund or dispute (`amount`; the payment id in `reference`); `owed`
    #: when some could not be taken (the balance was spent) and are kept as owed.
    CLAWBACK = "clawback"
    #: An operator granted credit or took it back (admin routes, `ciris-billing-proxy credits`):
    #: `amount` signed, `reference` the journal line, `outcome` the reason code.
    CREDIT_ADJUSTED = "credit_adjusted"
    #: A caller without an admin role asked for an admin route (403); `reference` the method and path.
    ADMIN_REFUSED = "admin_refused"


#: An event's log line: what `json.dumps` makes of the fields, filled in by `AuditTrail.record`
#: with each value encoded as JSON (strings by `encode_basestring_ascii`, as `json.dumps` does).
_LINE: Final = (
    '{"time": "%s", "event": "%s", "user": %s, "request_id": %s, "outcome": %s, "amount": %s, '
    '"reference": %s}'
)
_quoted = encode_basestring_ascii


def user_of(identity: Identity) -> str:
    return f"{identity.namespace}:{identity.user_id}"


class AuditTrail:
    """Where events go: `record()` from anywhere in the service; `lifespan` (a `cleanup_ctx` entry)
    opens the store, if there is one, and writes what is pending at shutdown."""

    def __init__(self, store: Callable[[], AuditStore] | None = None) -> None:
        self._make_store = store
        self._store: AuditStore | None = None
        self._log = logging.getLogger(AUDIT_LOGGER)
        # A line per spend on the gated hot path: made as the access log makes its lines.
        self._records = RecordTemplate(self._log, logging.INFO, "%s")
        self._times = UTCTimes()
        self._pending: deque[Row] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # A batch whose write was under way when the writer was cancelled (at shutdown): the next
        # write waits for it first, and keeps its rows again only if it failed.
        self._in_flight: tuple[asyncio.Future[None], list[Row]] | None = None

    def record(
        self,
        kind: AuditKind,
        user: str | None,
        outcome: str,
        *,
        amount: int | None = None,
        reference: str | None = None,
    ) -> None:
        logged = self._log.isEnabledFor(logging.INFO)
        if not logged and self._store is None:
            return  # nowhere to go: nothing made
        # Made per spend on the gated hot path: the line from a template (not `json.dumps` of a
        # dict), the time string made once per second.
        when = self._times.iso(time.time())
        rid = current_request_id.get()
        if logged:
            line = _LINE % (
                when,
                kind,  # a StrEnum: its text
                "null" if user is None else _quoted(user),
                "null" if rid is None else _quoted(rid),
                _quoted(outcome),
                "null" if amount is None else int(amount),
                "null" if reference is None else _quoted(reference),
            )
            self._records.emit((line,))
        if self._store is None:
            return
        if len(self._pending) >= MAX_PENDING:
            faults.warning("Audit events not kept in the store: %d are waiting for it", MAX_PENDING)
            return
        self._pending.append((when, str(kind), user, rid, outcome, amount, reference))
        if not self._wake.is_set():
            self._wake.set()

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        if self._make_store is None:
            yield
            return
        store = self._make_store()
        await store.open()
        self._store = store
        self._writer = asyncio.create_task(self._write_forever(store))
        try:
            yield
        finally:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._store = None
            if not await self._write(store) and self._pending:
                faults.warning("Audit events not kept in the store at shutdown: %d", len(self._pending))
            self._pending.clear()
            await store.close()

    async def _write_forever(self, store: AuditStore) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_SECONDS)
            self._wake.clear()
            if not await self._write(store):
                self._wake.set()
                await asyncio.sleep(RETRY_SECONDS)

    async def _write(self, store: AuditStore) -> bool:
        """Write what is pending, in batches; False when the store refused (the batch is kept)."""
        pending = self._pending
        while self._in_flight is not None or pending:
            if self._in_flight is None:
                batch = [pending.popleft() for _ in range(min(BATCH, len(pending)))]
                self._in_flight = (asyncio.ensure_future(store.add(batch)), batch)
            write, batch = self._in_flight
            refused: str | None = None
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                if not write.cancelled():
                    raise  # the writer is cancelled; its batch is still under way
                refused = "CancelledError"
            except Exception as exc:
                refused = type(exc).__name__
            self._in_flight = None
            if refused is not None:
                pending.extendleft(reversed(batch))
                faults.warning("Could not keep audit events in the store: %s", refused)
                return False
        return True
