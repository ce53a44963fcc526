"""The ledger on PostgreSQL: each write one transaction that starts by creating-or-locking the
account's row, so writes of one account queue on that lock across every process; each later
statement of the transaction then reads what the previous holder committed (READ COMMITTED takes a
fresh snapshot per statement). A spend or reservation is one round trip: the whole transaction is a
function the schema makes (`schema._TAKE`, `credit_take_v1`), which locks, reads the live grants,
chooses, and writes the grants taken from, the journal line and the balance events.

Every write of an account moves its version (`_LOCK`, and the function): processes of the first
ledger release, still running during a rolling upgrade, write a spend only if the version is the one
they read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from ..store import events
from ..store.postgres import PostgresDatabase
from .base import KeyReused, Ledger, NoReservation, Overdrawn, check_replay, event_data, grant_data, iso
from .model import (
    ENTRY_COLUMNS,
    ENTRY_FROM,
    GRANT_COLUMNS,
    Account,
    Balance,
    ClawedBack,
    Entry,
    Grant,
    Granted,
    Live,
    Usage,
    UsageTotal,
    balance_of,
    check_amount,
    claw_order,
    decode_taken,
    encode_taken,
    entry_of,
    grant_of,
    release,
)
from .schema import POSTGRES_SCHEMA

if TYPE_CHECKING:
    import asyncpg

_ACCOUNT: Final = "namespace = $1 AND user_id = $2 AND product = $3"
_LOCK: Final = """
INSERT INTO credit_accounts AS a (namespace, user_id, product, used, signed_up) VALUES ($1, $2, $3, 0, FALSE)
ON CONFLICT (namespace, user_id, product) DO UPDATE SET version = a.version + 1
RETURNING used, signed_up
"""
_LIVE: Final = (
    "SELECT id, kind, remaining, expires_at FROM credit_grants "
    f"WHERE {_ACCOUNT} AND remaining > 0 AND (expires_at IS NULL OR expires_at > $4::float8)"
)
_READ_ACCOUNT: Final = f"SELECT used, signed_up FROM credit_accounts WHERE {_ACCOUNT}"
# A spend or reservation, its whole transaction: `schema._TAKE`.
_TAKE: Final = "SELECT * FROM credit_take_v1(" + ", ".join(f"${n}" for n in range(1, 16)) + ")"
#: `credit_take_v1`'s outcome when there was not enough credit and the key was not used before.
_SHORT: Final = 1
_ENTRY: Final = """
INSERT INTO credit_entries (namespace, user_id, product, kind, amount, balance_after, used_after,
                            grant_id, spend_id, idempotency_key, reason, note, actor, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
"""
_GROUPS: Final = {"day": "substr(created_at, 1, 10)", "model": "COALESCE(model, '')", "product": "product"}


def _key(a: Account) -> tuple[str, str, str]:
    return (a.namespace, a.user_id, a.product)


class PostgresLedger(Ledger):
    engine: PostgresDatabase

    schema = POSTGRES_SCHEMA
    event_schema = events.POSTGRES_SCHEMA

    # -- reads -----------------------------------------------------------------------------------
    async def balance(self, account: Account) -> Balance:
        now = self.clock()
        async with self.engine.connection() as conn:
            return await self._balance(conn, account, now)

    async def _balance(self, conn: asyncpg.Connection, a: Account, now: float) -> Balance:
        row = await conn.fetchrow(_READ_ACCOUNT, *_key(a))
        used, signed_up = (int(row[0]), bool(row[1])) if row else (0, False)
        balance = balance_of(await self._live(conn, a, now), used)
        if signed_up:
            return balance
        free = max(self.signup(a.product) - used, 0)
        return Balance(balance.free + free, balance.credits, used, balance.soonest_expiry)

    async def _live(self, conn: asyncpg.Connection, a: Account, now: float) -> list[Live]:
        rows = await conn.fetch(_LIVE, *_key(a), now)
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def grants(self, account: Account) -> list[Grant]:
        async with self.engine.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {GRANT_COLUMNS} FROM credit_grants WHERE {_ACCOUNT} ORDER BY id DESC", *_key(account)
            )
        return [grant_of(r) for r in rows]

    async def entries(self, account: Account, limit: int, offset: int) -> tuple[list[Entry], int]:
        where = "e.namespace = $1 AND e.user_id = $2 AND e.product = $3"
        return await self._entries(where, list(_key(account)), limit, offset)

    async def journal(
        self,
        *,
        namespace: str | None = None,
        user_id: str | None = None,
        since: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Entry], int]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, op, value in (
            ("namespace", "=", namespace),
            ("user_id", "=", user_id),
            ("kind", "=", kind),
            ("created_at", ">=", since),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"e.{column} {op} ${len(args)}")
        return await self._entries(" AND ".join(clauses) or "TRUE", args, limit, offset)

    async def _entries(self, where: str, args: list[Any], limit: int, offset: int) -> tuple[list[Entry], int]:
        n = len(args)
        async with self.engine.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {ENTRY_COLUMNS} FROM {ENTRY_FROM} WHERE {where} "
                f"ORDER BY e.id DESC LIMIT ${n + 1} OFFSET ${n + 2}",
                *args,
                limit,
                offset,
            )
            total = await conn.fetchval(f"SELECT COUNT(*) FROM {ENTRY_FROM} WHERE {where}", *args)
        return [entry_of(r) for r in rows], int(total)

    async def usage_totals(
        self, namespace: str, user_id: str, since: str, until: str, group_by: str
    ) -> list[UsageTotal]:
        group = _GROUPS[group_by]
        async with self.engine.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {group} AS g, COUNT(*), SUM(cost), SUM(COALESCE(input_tokens, 0)), "
                "SUM(COALESCE(output_tokens, 0)) FROM credit_entries "
                "WHERE namespace = $1 AND user_id = $2 AND created_at >= $3 AND created_at < $4 "
                "AND state IN ('spent', 'settled') GROUP BY g ORDER BY g",
                namespace,
                user_id,
                since,
                until,
            )
        return [UsageTotal(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]

    # -- writes ----------------------------------------------------------------------------------
    async def _open_account(self, conn: asyncpg.Connection, a: Account, now: float) -> int:
        """Lock the account (made on its first write, with its signup grant); its uses spent."""
        row = await conn.fetchrow(_LOCK, *_key(a))
        used = int(row[0])
        if not row[1]:
            await conn.execute(f"UPDATE credit_accounts SET signed_up = TRUE WHERE {_ACCOUNT}", *_key(a))
            free = self.signup(a.product)
            if free > 0:
                await conn.execute(
                    "INSERT INTO credit_grants (namespace, user_id, product, kind, source, amount, "
                    "remaining, reason, created_at) "
                    "VALUES ($1, $2, $3, 'free', 'signup', $4, $5, 'signup', $6)",
                    *_key(a),
                    free,
                    max(free - used, 0),
                    iso(now),
                )
        return used

    async def _entry(
        self,
        conn: asyncpg.Connection,
        a: Account,
        kind: str,
        amount: int,
        after: Balance,
        now: float,
        *,
        grant_id: int | None = None,
        spend_id: int | None = None,
        key: str | None = None,
        reason: str | None = None,
        note: str | None = None,
        actor: str | None = None,
    ) -> None:
        await conn.execute(
            _ENTRY,
            *_key(a),
            kind,
            amount,
            after.total,
            after.used,
            grant_id,
            spend_id,
            key,
            reason,
            note,
            actor,
            iso(now),
        )

    async def spend(
        self, account: Account, key: str, cost: int = 1, usage: Usage | None = None
    ) -> Balance | None:
        check_amount(cost)
        return await self._take(account, key, cost, "spent", usage)

    async def reserve(self, account: Account, key: str, amount: int) -> Balance | None:
        check_amount(amount)
        return await self._take(account, key, amount, "reserved", None)

    async def _take(self, a: Account, key: str, cost: int, state: str, usage: Usage | None) -> Balance | None:
        import asyncpg

        now = self.clock()
        u = usage or _NO_USAGE
        async with self.engine.connection() as conn:
            try:
                row = await conn.fetchrow(
                    _TAKE,
                    a.namespace,
                    a.user_id,
                    a.product,
                    key,
                    cost,
                    state,
                    u.model,
                    u.input_tokens,
                    u.output_tokens,
                    u.tool,
                    u.metadata_json(),
                    now,
                    iso(now),
                    self.signup(a.product),
                    self.low_balance_threshold,
                )
            except asyncpg.UniqueViolationError:
                # The key spent before: nothing was written. It answers as spent, as things are now.
                return await self._balance(conn, a, now)
        if row[0] == _SHORT:
            return None
        return Balance(row[1], row[2], row[3], row[4])

    async def _spend_row(self, conn: asyncpg.Connection, a: Account, key: str) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT id, state, cost, taken FROM credit_entries WHERE {_ACCOUNT} AND idempotency_key = $4",
            *_key(a),
            key,
        )

    async def settle(self, account: Account, key: str, cost: int, usage: Usage | None = None) -> Balance:
        if cost < 0:
            raise ValueError("a settled cost is 0 or more")
        now = self.clock()
        async with self.engine.connection() as conn, conn.transaction():
            await self._open_account(conn, account, now)
            row = await self._spend_row(conn, account, key)
            if row is None or row[1] is None:
                raise NoReservation(key)
            spend_id, state, reserved = int(row[0]), str(row[1]), int(row[2])
            if state != "reserved":
                return await self._balance(conn, account, now)
            keep = min(cost, reserved)
            await self._return(conn, account, spend_id, str(row[3]), reserved - keep)
            u = usage or _NO_USAGE
            await conn.execute(
                "UPDATE credit_entries SET state = 'settled', cost = $1, model = $2, input_tokens = $3, "
                "output_tokens = $4, tool = $5, metadata = $6 WHERE id = $7",
                keep,
                u.model,
                u.input_tokens,
                u.output_tokens,
                u.tool,
                u.metadata_json(),
                spend_id,
            )
            after = await self._balance(conn, account, now)
            await self._entry(conn, account, "settle", reserved - keep, after, now, spend_id=spend_id)
            return after

    async def give_back(self, account: Account, key: str) -> Balance | None:
        now = self.clock()
        async with self.engine.connection() as conn, conn.transaction():
            await self._open_account(conn, account, now)
            row = await self._spend_row(conn, account, key)
            if row is None or row[1] in (None, "given_back"):
                return None
            spend_id, cost = int(row[0]), int(row[2])
            await self._return(conn, account, spend_id, str(row[3]), cost)
            await conn.execute("UPDATE credit_entries SET state = 'given_back' WHERE id = $1", spend_id)
            after = await self._balance(conn, account, now)
            await self._entry(conn, account, "give_back", cost, after, now, spend_id=spend_id)
            return after

    async def _return(
        self, conn: asyncpg.Connection, a: Account, spend_id: int, taken: str, amount: int
    ) -> None:
        if amount == 0:
            return
        took = decode_taken(taken)
        if took:
            rows = await conn.fetch(
                "SELECT id, kind, remaining, expires_at FROM credit_grants WHERE id = ANY($1::bigint[])",
                [g for g, _ in took],
            )
            back, kept = release([(r[0], r[1], r[2], r[3]) for r in rows], took, amount)
            await conn.execute(
                "UPDATE credit_grants g SET remaining = g.remaining + t.n "
                "FROM unnest($1::bigint[], $2::bigint[]) AS t(grant_id, n) WHERE g.id = t.grant_id",
                [g for g, _ in back],
                [n for _, n in back],
            )
            await conn.execute(
                "UPDATE credit_entries SET taken = $1 WHERE id = $2", encode_taken(kept), spend_id
            )
        else:
            # Spent before grants existed: the use goes back to the signup grant made since.
            await conn.execute(
                "UPDATE credit_grants SET remaining = LEAST(amount, remaining + $4) "
                f"WHERE {_ACCOUNT} AND source = 'signup'",
                *_key(a),
                amount,
            )
        await conn.execute(
            f"UPDATE credit_accounts SET used = GREATEST(used - $4, 0) WHERE {_ACCOUNT}", *_key(a), amount
        )

    async def attach_usage(self, account: Account, key: str, usage: Usage) -> None:
        async with self.engine.connection() as conn:
            await conn.execute(
                "UPDATE credit_entries SET model = $5, input_tokens = $6, output_tokens = $7, tool = $8, "
                f"metadata = $9 WHERE {_ACCOUNT} AND idempotency_key = $4 AND state IS NOT NULL",
                *_key(account),
                key,
                usage.model,
                usage.input_tokens,
                usage.output_tokens,
                usage.tool,
                usage.metadata_json(),
            )

    async def grant(
        self,
        account: Account,
        amount: int,
        kind: str,
        *,
        source: str,
        reason: str,
        note: str | None = None,
        actor: str | None = None,
        expires_at: int | None = None,
        key: str | None = None,
    ) -> Granted:
        check_amount(amount)
        now = self.clock()
        async with self.engine.connection() as conn, conn.transaction():
            await self._open_account(conn, account, now)
            if key is not None:
                found = await self._keyed(conn, account, key, "grant")
                if found is not None and found[0] is not None:
                    grant = await self._grant(conn, found[0])
                    check_replay(grant, key, amount, kind, source, reason, expires_at)
                    return Granted(grant, await self._balance(conn, account, now), replayed=True)
            grant_id = await conn.fetchval(
                "INSERT INTO credit_grants (namespace, user_id, product, kind, source, amount, remaining, "
                "expires_at, reason, note, actor, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $10, $11) RETURNING id",
                *_key(account),
                kind,
                source,
                amount,
                expires_at,
                reason,
                note,
                actor,
                iso(now),
            )
            after = await self._balance(conn, account, now)
            await self._entry(
                conn,
                account,
                "grant",
                amount,
                after,
                now,
                grant_id=grant_id,
                key=key,
                reason=reason,
                note=note,
                actor=actor,
            )
            grant = await self._grant(conn, grant_id)
            if not account.product:
                data = event_data(account, **grant_data(grant, after))
                await events.add_postgres(conn, "credit.granted", account.namespace, account.user_id, data)
            return Granted(grant, after)

    async def _keyed(
        self, conn: asyncpg.Connection, a: Account, key: str, kind: str
    ) -> tuple[int | None, int] | None:
        row = await conn.fetchrow(
            f"SELECT grant_id, amount, kind FROM credit_entries WHERE {_ACCOUNT} AND idempotency_key = $4",
            *_key(a),
            key,
        )
        if row is not None and row[2] != kind:
            raise KeyReused(key)
        return None if row is None else (row[0], int(row[1]))

    async def _grant(self, conn: asyncpg.Connection, grant_id: int) -> Grant:
        return grant_of(
            await conn.fetchrow(f"SELECT {GRANT_COLUMNS} FROM credit_grants WHERE id = $1", grant_id)
        )

    async def claw_back(
        self,
        account: Account,
        amount: int,
        *,
        reason: str,
        note: str | None = None,
        actor: str | None = None,
        kind: str | None = None,
        grant_id: int | None = None,
        key: str | None = None,
        partial: bool = False,
    ) -> ClawedBack:
        check_amount(amount)
        now = self.clock()
        async with self.engine.connection() as conn, conn.transaction():
            used = await self._open_account(conn, account, now)
            if key is not None:
                found = await self._keyed(conn, account, key, "clawback")
                if found is not None:
                    return ClawedBack(-found[1], (), await self._balance(conn, account, now), replayed=True)
            every = await self._live(conn, account, now)
            live = [g for g in every if kind is None or g[1] == kind]
            before = balance_of(every, used)
            taken = claw_order(live, amount, grant_id)
            total = sum(n for _, n in taken)
            if total < amount and not partial:
                raise Overdrawn(sum(g[2] for g in live))
            await conn.execute(
                "UPDATE credit_grants g SET remaining = g.remaining - t.n "
                "FROM unnest($1::bigint[], $2::bigint[]) AS t(grant_id, n) WHERE g.id = t.grant_id",
                [g for g, _ in taken],
                [n for _, n in taken],
            )
            after = await self._balance(conn, account, now)
            await self._entry(
                conn,
                account,
                "clawback",
                -total,
                after,
                now,
                grant_id=taken[0][0] if len(taken) == 1 else grant_id,
                key=key,
                reason=reason,
                note=note,
                actor=actor,
            )
            ids = tuple(g for g, _ in taken)
            if not account.product and total:
                data = event_data(
                    account,
                    amount=total,
                    grant_ids=list(ids),
                    reason=reason,
                    balance_before=before.total,
                    balance_after=after.total,
                )
                await events.add_postgres(
                    conn, "credit.clawed_back", account.namespace, account.user_id, data
                )
            return ClawedBack(total, ids, after)

    async def expire_due(self) -> int:
        now = self.clock()
        async with self.engine.connection() as conn, conn.transaction():
            # Row locks make a concurrent sweep wait, then skip the rows this one marked.
            rows = await conn.fetch(
                "UPDATE credit_grants SET expiry_announced = TRUE "
                "WHERE expires_at IS NOT NULL AND expires_at <= $1::float8 AND NOT expiry_announced "
                f"RETURNING {GRANT_COLUMNS}, namespace, user_id, product",
                now,
            )
            announced = 0
            for row in rows:
                grant, a = grant_of(row), Account(row[10], row[11], row[12])
                if grant.remaining == 0:
                    continue
                after = await self._balance(conn, a, now)
                await self._entry(
                    conn, a, "expire", -grant.remaining, after, now, grant_id=grant.id, reason="expired"
                )
                if not a.product:
                    data = event_data(
                        a,
                        grant_id=grant.id,
                        kind=grant.kind,
                        amount=grant.remaining,
                        expired_at=grant.expires_at,
                        balance_after=after.total,
                    )
                    await events.add_postgres(conn, "credit.expired", a.namespace, a.user_id, data)
                announced += 1
            return announced


_NO_USAGE: Final = Usage()
