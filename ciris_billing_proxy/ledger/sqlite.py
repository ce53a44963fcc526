"""The ledger on SQLite: each call one transaction (`BEGIN IMMEDIATE`, which other processes on the
file wait for) in one hop to the engine's worker thread."""

from __future__ import annotations

import sqlite3
from typing import Any

from ..store import events
from ..store.sqlite import SQLiteDatabase, transaction
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
    allocate,
    balance_of,
    check_amount,
    claw_order,
    decode_taken,
    encode_taken,
    entry_of,
    grant_of,
    less,
    release,
    spend_events,
)
from .schema import SQLITE_SCHEMA

_ACCOUNT = "namespace = ? AND user_id = ? AND product = ?"
_ACCOUNT_AND_LIVE = (
    "SELECT a.used, a.signed_up, g.id, g.kind, g.remaining, g.expires_at FROM credit_accounts a "
    "LEFT JOIN credit_grants g ON g.namespace = a.namespace AND g.user_id = a.user_id "
    "AND g.product = a.product AND g.remaining > 0 AND (g.expires_at IS NULL OR g.expires_at > ?) "
    "WHERE a.namespace = ? AND a.user_id = ? AND a.product = ?"
)
_TAKE_FROM_GRANT = "UPDATE credit_grants SET remaining = remaining - ? WHERE id = ?"
_SET_USED = f"UPDATE credit_accounts SET used = ? WHERE {_ACCOUNT}"
# A spend's or reservation's line, its kind and state written in (`?4` is the cost, twice).
_INSERT_TAKE = (
    "INSERT INTO credit_entries (namespace, user_id, product, kind, amount, balance_after, used_after, "
    "idempotency_key, state, cost, taken, created_at) VALUES (?1, ?2, ?3, '{kind}', -?4, ?5, ?6, ?7, "
    "'{state}', ?4, ?8, ?9)"
)
_INSERT_TAKE_WITH_USAGE = (
    "INSERT INTO credit_entries (namespace, user_id, product, kind, amount, balance_after, used_after, "
    "idempotency_key, state, cost, taken, created_at, model, input_tokens, output_tokens, tool, metadata) "
    "VALUES (?1, ?2, ?3, '{kind}', -?4, ?5, ?6, ?7, '{state}', ?4, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
)
_KINDS = {"spent": "spend", "reserved": "reserve"}
#: state -> (the line's INSERT, the same with usage)
_INSERTS = {
    state: (
        _INSERT_TAKE.format(kind=kind, state=state),
        _INSERT_TAKE_WITH_USAGE.format(kind=kind, state=state),
    )
    for state, kind in _KINDS.items()
}
_GROUPS = {"day": "substr(created_at, 1, 10)", "model": "COALESCE(model, '')", "product": "product"}


def _key(a: Account) -> tuple[str, str, str]:
    return (a.namespace, a.user_id, a.product)


class SQLiteLedger(Ledger):
    engine: SQLiteDatabase

    schema = SQLITE_SCHEMA
    event_schema = events.SQLITE_SCHEMA

    # -- reads -----------------------------------------------------------------------------------
    async def balance(self, account: Account) -> Balance:
        now = self.clock()
        return await self.engine.run(lambda conn: self._balance(conn, account, now))

    def _balance(self, conn: sqlite3.Connection, a: Account, now: float) -> Balance:
        row = conn.execute(
            f"SELECT used, signed_up FROM credit_accounts WHERE {_ACCOUNT}", _key(a)
        ).fetchone()
        used, signed_up = (int(row[0]), bool(row[1])) if row else (0, False)
        balance = balance_of(self._live(conn, a, now), used)
        if signed_up:
            return balance
        # Not written yet: the signup grant it will get, less what was spent before grants.
        free = max(self.signup(a.product) - used, 0)
        return Balance(balance.free + free, balance.credits, used, balance.soonest_expiry)

    def _live(self, conn: sqlite3.Connection, a: Account, now: float) -> list[Live]:
        rows = conn.execute(
            "SELECT id, kind, remaining, expires_at FROM credit_grants "
            f"WHERE {_ACCOUNT} AND remaining > 0 AND (expires_at IS NULL OR expires_at > ?)",
            (*_key(a), now),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def grants(self, account: Account) -> list[Grant]:
        def read(conn: sqlite3.Connection) -> list[Grant]:
            rows = conn.execute(
                f"SELECT {GRANT_COLUMNS} FROM credit_grants WHERE {_ACCOUNT} ORDER BY id DESC",
                _key(account),
            ).fetchall()
            return [grant_of(r) for r in rows]

        return await self.engine.run(read)

    async def entries(self, account: Account, limit: int, offset: int) -> tuple[list[Entry], int]:
        where = "e.namespace = ? AND e.user_id = ? AND e.product = ?"
        return await self._entries(where, _key(account), limit, offset)

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
        clauses, args = [], []
        for column, value in (("namespace", namespace), ("user_id", user_id), ("kind", kind)):
            if value is not None:
                clauses.append(f"e.{column} = ?")
                args.append(value)
        if since is not None:
            clauses.append("e.created_at >= ?")
            args.append(since)
        return await self._entries(" AND ".join(clauses) or "1", tuple(args), limit, offset)

    async def _entries(
        self, where: str, args: tuple[Any, ...], limit: int, offset: int
    ) -> tuple[list[Entry], int]:
        def read(conn: sqlite3.Connection) -> tuple[list[Entry], int]:
            rows = conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM {ENTRY_FROM} WHERE {where} ORDER BY e.id DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            (total,) = conn.execute(f"SELECT COUNT(*) FROM {ENTRY_FROM} WHERE {where}", args).fetchone()
            return [entry_of(r) for r in rows], int(total)

        return await self.engine.run(read)

    async def usage_totals(
        self, namespace: str, user_id: str, since: str, until: str, group_by: str
    ) -> list[UsageTotal]:
        group = _GROUPS[group_by]

        def read(conn: sqlite3.Connection) -> list[UsageTotal]:
            rows = conn.execute(
                f"SELECT {group} AS g, COUNT(*), SUM(cost), SUM(COALESCE(input_tokens, 0)), "
                "SUM(COALESCE(output_tokens, 0)) FROM credit_entries "
                "WHERE namespace = ? AND user_id = ? AND created_at >= ? AND created_at < ? "
                "AND state IN ('spent', 'settled') GROUP BY g ORDER BY g",
                (namespace, user_id, since, until),
            ).fetchall()
            return [UsageTotal(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]

        return await self.engine.run(read)

    # -- writes ----------------------------------------------------------------------------------
    def _open_account(self, conn: sqlite3.Connection, a: Account, now: float) -> int:
        """The account's uses spent, its row and signup grant made if this is its first write."""
        row = conn.execute(
            f"SELECT used, signed_up FROM credit_accounts WHERE {_ACCOUNT}", _key(a)
        ).fetchone()
        if row is not None and row[1]:
            return int(row[0])
        used = 0 if row is None else int(row[0])
        if row is None:
            conn.execute(
                "INSERT INTO credit_accounts (namespace, user_id, product, used, signed_up) "
                "VALUES (?, ?, ?, 0, 1)",
                _key(a),
            )
        else:
            conn.execute(f"UPDATE credit_accounts SET signed_up = 1 WHERE {_ACCOUNT}", _key(a))
        free = self.signup(a.product)
        if free > 0:
            conn.execute(
                "INSERT INTO credit_grants (namespace, user_id, product, kind, source, amount, remaining, "
                "reason, created_at) VALUES (?, ?, ?, 'free', 'signup', ?, ?, 'signup', ?)",
                (*_key(a), free, max(free - used, 0), iso(now)),
            )
        return used

    def _entry(
        self,
        conn: sqlite3.Connection,
        a: Account,
        kind: str,
        amount: int,
        after: Balance,
        at: str,
        *,
        grant_id: int | None = None,
        spend_id: int | None = None,
        key: str | None = None,
        reason: str | None = None,
        note: str | None = None,
        actor: str | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO credit_entries (namespace, user_id, product, kind, amount, balance_after, "
            "used_after, grant_id, spend_id, idempotency_key, reason, note, actor, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
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
                at,
            ),
        )

    def _announce_spend(
        self, conn: sqlite3.Connection, a: Account, key: str, before: int, after: int
    ) -> None:
        if a.product:
            return  # a product's own credits: no balance events (docs/credits.md)
        for kind in spend_events(before, after, self.low_balance_threshold):
            data = event_data(
                a, balance_before=before, balance_after=after, threshold=self.low_balance_threshold, key=key
            )
            events.add_sqlite(conn, kind, a.namespace, a.user_id, data)

    async def spend(
        self, account: Account, key: str, cost: int = 1, usage: Usage | None = None
    ) -> Balance | None:
        check_amount(cost)
        now = self.clock()
        return await self.engine.run(lambda conn: self._take(conn, account, key, cost, now, "spent", usage))

    async def reserve(self, account: Account, key: str, amount: int) -> Balance | None:
        check_amount(amount)
        now = self.clock()
        return await self.engine.run(
            lambda conn: self._take(conn, account, key, amount, now, "reserved", None)
        )

    def _take(
        self,
        conn: sqlite3.Connection,
        a: Account,
        key: str,
        cost: int,
        now: float,
        state: str,
        usage: Usage | None,
    ) -> Balance | None:
        try:
            return self._take_new(conn, a, key, cost, now, state, usage)
        except sqlite3.IntegrityError:
            # The key spent before (its row's unique key): all of this was rolled back.
            return self._balance(conn, a, now)

    def _take_new(
        self,
        conn: sqlite3.Connection,
        a: Account,
        key: str,
        cost: int,
        now: float,
        state: str,
        usage: Usage | None,
    ) -> Balance | None:
        account = (a.namespace, a.user_id, a.product)
        with transaction(conn) as cursor:
            rows = cursor.execute(_ACCOUNT_AND_LIVE, (now, *account)).fetchall()
            if rows and rows[0][1]:
                used = rows[0][0]
                live: list[Live] = [r[2:] for r in rows if r[2] is not None]
            else:
                used, live = self._open_account(conn, a, now), self._live(conn, a, now)
            before = balance_of(live, used)
            if before.total < cost:
                # Not enough now, unless this key spent before (then it answers as spent).
                return before if self._spent(conn, a, key) else None
            taken = allocate(live, cost)
            for grant_id, n in taken:
                cursor.execute(_TAKE_FROM_GRANT, (n, grant_id))
            cursor.execute(_SET_USED, (used + cost, *account))
            after = less(before, live, taken, cost)
            line = (*account, cost, after.total, after.used, key, encode_taken(taken), iso(now))
            insert, insert_with_usage = _INSERTS[state]
            if usage is None:
                cursor.execute(insert, line)
            else:
                cursor.execute(
                    insert_with_usage,
                    (
                        *line,
                        usage.model,
                        usage.input_tokens,
                        usage.output_tokens,
                        usage.tool,
                        usage.metadata_json(),
                    ),
                )
            if self.low_balance_threshold is not None or after.total == 0:
                self._announce_spend(conn, a, key, before.total, after.total)
            return after

    def _spent(self, conn: sqlite3.Connection, a: Account, key: str) -> bool:
        row = conn.execute(
            f"SELECT 1 FROM credit_entries WHERE {_ACCOUNT} AND idempotency_key = ?", (*_key(a), key)
        ).fetchone()
        return row is not None

    async def settle(self, account: Account, key: str, cost: int, usage: Usage | None = None) -> Balance:
        if cost < 0:
            raise ValueError("a settled cost is 0 or more")
        now = self.clock()

        def write(conn: sqlite3.Connection) -> Balance:
            with transaction(conn):
                row = conn.execute(
                    "SELECT id, state, cost, taken FROM credit_entries "
                    f"WHERE {_ACCOUNT} AND idempotency_key = ?",
                    (*_key(account), key),
                ).fetchone()
                if row is None or row[1] is None:
                    raise NoReservation(key)
                spend_id, state, reserved = int(row[0]), str(row[1]), int(row[2])
                if state != "reserved":
                    return self._balance(conn, account, now)
                keep = min(cost, reserved)
                self._return(conn, account, spend_id, str(row[3]), reserved - keep)
                u = usage or _NO_USAGE
                conn.execute(
                    "UPDATE credit_entries SET state = 'settled', cost = ?, model = ?, input_tokens = ?, "
                    "output_tokens = ?, tool = ?, metadata = ? WHERE id = ?",
                    (keep, u.model, u.input_tokens, u.output_tokens, u.tool, u.metadata_json(), spend_id),
                )
                after = self._balance(conn, account, now)
                self._entry(conn, account, "settle", reserved - keep, after, iso(now), spend_id=spend_id)
                return after

        return await self.engine.run(write)

    async def give_back(self, account: Account, key: str) -> Balance | None:
        now = self.clock()

        def write(conn: sqlite3.Connection) -> Balance | None:
            with transaction(conn):
                row = conn.execute(
                    "SELECT id, state, cost, taken FROM credit_entries "
                    f"WHERE {_ACCOUNT} AND idempotency_key = ?",
                    (*_key(account), key),
                ).fetchone()
                if row is None or row[1] in (None, "given_back"):
                    return None
                spend_id, cost = int(row[0]), int(row[2])
                self._return(conn, account, spend_id, str(row[3]), cost)
                conn.execute("UPDATE credit_entries SET state = 'given_back' WHERE id = ?", (spend_id,))
                after = self._balance(conn, account, now)
                self._entry(conn, account, "give_back", cost, after, iso(now), spend_id=spend_id)
                return after

        return await self.engine.run(write)

    def _return(self, conn: sqlite3.Connection, a: Account, spend_id: int, taken: str, amount: int) -> None:
        """Give `amount` of what spend `spend_id` took (`taken`) back to its grants, last taken
        first, and take it off the uses spent."""
        if amount == 0:
            return
        took = decode_taken(taken)
        if took:
            marks = ",".join("?" * len(took))
            rows = conn.execute(
                f"SELECT id, kind, remaining, expires_at FROM credit_grants WHERE id IN ({marks})",
                [g for g, _ in took],
            ).fetchall()
            back, kept = release([(r[0], r[1], r[2], r[3]) for r in rows], took, amount)
            for grant_id, n in back:
                conn.execute("UPDATE credit_grants SET remaining = remaining + ? WHERE id = ?", (n, grant_id))
            conn.execute("UPDATE credit_entries SET taken = ? WHERE id = ?", (encode_taken(kept), spend_id))
        else:
            # Spent before grants existed: the use goes back to the signup grant made since.
            conn.execute(
                "UPDATE credit_grants SET remaining = MIN(amount, remaining + ?) "
                f"WHERE {_ACCOUNT} AND source = 'signup'",
                (amount, *_key(a)),
            )
        conn.execute(
            f"UPDATE credit_accounts SET used = MAX(used - ?, 0) WHERE {_ACCOUNT}", (amount, *_key(a))
        )

    async def attach_usage(self, account: Account, key: str, usage: Usage) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "UPDATE credit_entries SET model = ?, input_tokens = ?, output_tokens = ?, tool = ?, "
                    f"metadata = ? WHERE {_ACCOUNT} AND idempotency_key = ? AND state IS NOT NULL",
                    (
                        usage.model,
                        usage.input_tokens,
                        usage.output_tokens,
                        usage.tool,
                        usage.metadata_json(),
                        *_key(account),
                        key,
                    ),
                )

        await self.engine.run(write)

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

        def write(conn: sqlite3.Connection) -> Granted:
            with transaction(conn):
                if key is not None:
                    found = self._keyed(conn, account, key, "grant")
                    if found is not None and found[0] is not None:
                        grant = self._grant(conn, found[0])
                        check_replay(grant, key, amount, kind, source, reason, expires_at)
                        return Granted(grant, self._balance(conn, account, now), replayed=True)
                self._open_account(conn, account, now)
                grant_id = conn.execute(
                    "INSERT INTO credit_grants (namespace, user_id, product, kind, source, amount, "
                    "remaining, expires_at, reason, note, actor, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*_key(account), kind, source, amount, amount, expires_at, reason, note, actor, iso(now)),
                ).lastrowid
                assert grant_id is not None
                after = self._balance(conn, account, now)
                self._entry(
                    conn,
                    account,
                    "grant",
                    amount,
                    after,
                    iso(now),
                    grant_id=grant_id,
                    key=key,
                    reason=reason,
                    note=note,
                    actor=actor,
                )
                grant = self._grant(conn, grant_id)
                if not account.product:
                    data = event_data(account, **grant_data(grant, after))
                    events.add_sqlite(conn, "credit.granted", account.namespace, account.user_id, data)
                return Granted(grant, after)

        return await self.engine.run(write)

    def _keyed(
        self, conn: sqlite3.Connection, a: Account, key: str, kind: str
    ) -> tuple[int | None, int] | None:
        row = conn.execute(
            f"SELECT grant_id, amount, kind FROM credit_entries WHERE {_ACCOUNT} AND idempotency_key = ?",
            (*_key(a), key),
        ).fetchone()
        if row is not None and row[2] != kind:
            raise KeyReused(key)
        return None if row is None else (row[0], int(row[1]))

    def _grant(self, conn: sqlite3.Connection, grant_id: int) -> Grant:
        return grant_of(
            conn.execute(f"SELECT {GRANT_COLUMNS} FROM credit_grants WHERE id = ?", (grant_id,)).fetchone()
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

        def write(conn: sqlite3.Connection) -> ClawedBack:
            with transaction(conn):
                if key is not None:
                    found = self._keyed(conn, account, key, "clawback")
                    if found is not None:
                        return ClawedBack(-found[1], (), self._balance(conn, account, now), replayed=True)
                used = self._open_account(conn, account, now)
                every = self._live(conn, account, now)
                live = [g for g in every if kind is None or g[1] == kind]
                before = balance_of(every, used)
                taken = claw_order(live, amount, grant_id)
                total = sum(n for _, n in taken)
                if total < amount and not partial:
                    raise Overdrawn(sum(g[2] for g in live))
                conn.executemany(
                    "UPDATE credit_grants SET remaining = remaining - ? WHERE id = ?",
                    [(n, g) for g, n in taken],
                )
                after = self._balance(conn, account, now)
                self._entry(
                    conn,
                    account,
                    "clawback",
                    -total,
                    after,
                    iso(now),
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
                    events.add_sqlite(conn, "credit.clawed_back", account.namespace, account.user_id, data)
                return ClawedBack(total, ids, after)

        return await self.engine.run(write)

    async def expire_due(self) -> int:
        now = self.clock()

        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                rows = conn.execute(
                    "UPDATE credit_grants SET expiry_announced = 1 "
                    "WHERE expires_at IS NOT NULL AND expires_at <= ? AND NOT expiry_announced "
                    f"RETURNING {GRANT_COLUMNS}, namespace, user_id, product",
                    (now,),
                ).fetchall()
                announced = 0
                for row in rows:
                    grant, a = grant_of(row), Account(row[10], row[11], row[12])
                    if grant.remaining == 0:
                        continue
                    after = self._balance(conn, a, now)
                    self._entry(
                        conn,
                        a,
                        "expire",
                        -grant.remaining,
                        after,
                        iso(now),
                        grant_id=grant.id,
                        reason="expired",
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
                        events.add_sqlite(conn, "credit.expired", a.namespace, a.user_id, data)
                    announced += 1
                return announced

        return await self.engine.run(write)


_NO_USAGE = Usage()
