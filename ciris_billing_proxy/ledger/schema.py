"""The ledger's tables on each engine, and the step that carries the usage ledger's records over.

* `credit_accounts`: one row per account (identity and product): the uses spent in all, and whether
  its signup grant was made. Every write of an account locks this row first (PostgreSQL), so the
  writes of one account are serialised across processes; SQLite's `BEGIN IMMEDIATE` does the same.
* `credit_grants`: credit as it arrived (kind, amount, what is left, expiry, source, reason, who).
* `credit_entries`: the journal, one line per movement, with the balance after it. A spend's or a
  reservation's own line is also its record: its idempotency key (unique per account), its state,
  what it costs now, what it took from which grants (`taken`: `grant_id:amount` pairs) and the
  usage the handler attached; a give-back's or settlement's line points at it (`spend_id`). One row
  and one index entry per spend, so a spend writes few pages.

Before grants, the `simple` provider kept `usage` (uses spent per user; a product's under
`product + "\\x1f" + namespace`) and `usage_events`. The first step copies both into the new tables
(each user keeps the uses spent; the free uses become a signup grant of what is left on the user's
first write, see `Ledger`), then drops them.
"""

from __future__ import annotations

from typing import Final

from ..store.engine import Schema

_OLD_USAGE_SQLITE: Final = (
    """CREATE TABLE IF NOT EXISTS usage (
        namespace TEXT NOT NULL,
        user_id   TEXT NOT NULL,
        used      INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
        PRIMARY KEY (namespace, user_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS usage_events (
        id              INTEGER PRIMARY KEY,
        namespace       TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        kind            TEXT NOT NULL CHECK (kind IN ('use', 'give_back')),
        used_after      INTEGER NOT NULL,
        created_at      TEXT NOT NULL,
        UNIQUE (namespace, user_id, idempotency_key, kind)
    )""",
)

_TABLES: Final = """
CREATE TABLE {exists} credit_accounts (
    namespace TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    product   TEXT NOT NULL DEFAULT '',
    used      BIGINT NOT NULL DEFAULT 0 CHECK (used >= 0),
    signed_up BOOLEAN NOT NULL DEFAULT FALSE,{version}
    PRIMARY KEY (namespace, user_id, product)
){without_rowid};
CREATE TABLE {exists} credit_grants (
    id         {id},
    namespace  TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    product    TEXT NOT NULL DEFAULT '',
    kind       TEXT NOT NULL CHECK (kind IN ('free', 'promotional', 'paid')),
    source     TEXT NOT NULL CHECK (source IN ('purchase', 'admin', 'signup', 'store')),
    amount     BIGINT NOT NULL CHECK (amount > 0),
    remaining  BIGINT NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    expires_at BIGINT,
    reason     TEXT NOT NULL,
    note       TEXT,
    actor      TEXT,
    created_at TEXT NOT NULL,
    expiry_announced BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX {exists} credit_grants_account ON credit_grants (namespace, user_id, product);
CREATE INDEX {exists} credit_grants_due ON credit_grants (expires_at)
    WHERE expires_at IS NOT NULL AND NOT expiry_announced;
CREATE TABLE {exists} credit_entries (
    id              {id},
    namespace       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    product         TEXT NOT NULL DEFAULT '',
    kind            TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    balance_after   BIGINT,
    used_after      BIGINT NOT NULL,
    grant_id        BIGINT,
    spend_id        BIGINT,
    idempotency_key TEXT,
    state           TEXT CHECK (state IN ('spent', 'reserved', 'settled', 'given_back')),
    cost            BIGINT,
    taken           TEXT,
    model           TEXT,
    input_tokens    BIGINT,
    output_tokens   BIGINT,
    tool            TEXT,
    metadata        TEXT,
    reason          TEXT,
    note            TEXT,
    actor           TEXT,
    created_at      TEXT NOT NULL,
    UNIQUE (namespace, user_id, product, idempotency_key)
)
"""

#: SQLite evaluates a constant `IN` list of more than two values by building a temporary table, on
#: every row checked: each spend's journal line paid for one (about 12,000 instructions) to check its
#: `state`. Step 2 rebuilds the table with the same check written as comparisons.
_STATE_IN = "state IN ('spent', 'reserved', 'settled', 'given_back')"
_STATE_COMPARED = "state = 'spent' OR state = 'reserved' OR state = 'settled' OR state = 'given_back'"


def _entries_rebuilt() -> tuple[str, ...]:
    create = _TABLES[_TABLES.index("CREATE TABLE {exists} credit_entries") :]
    assert _STATE_IN in create
    create = create.replace(_STATE_IN, _STATE_COMPARED).format(exists="", id="INTEGER PRIMARY KEY")
    create = create.replace("TABLE  ", "TABLE ")
    return (
        create.replace("credit_entries", "credit_entries_rebuilt", 1),
        "INSERT INTO credit_entries_rebuilt SELECT * FROM credit_entries",
        "DROP TABLE credit_entries",
        "ALTER TABLE credit_entries_rebuilt RENAME TO credit_entries",
    )


# The usage ledger's namespaces are `product \x1f namespace` for a product's uses.
_COPY: Final = """
INSERT INTO credit_accounts (namespace, user_id, product, used)
SELECT {ns}, user_id, {product}, used FROM usage;
INSERT INTO credit_entries (namespace, user_id, product, kind, amount, used_after, idempotency_key, state,
                            cost, taken, created_at)
SELECT {ns}, user_id, {product}, 'spend', -1, used_after, idempotency_key,
       CASE WHEN EXISTS (SELECT 1 FROM usage_events b WHERE b.namespace = u.namespace
            AND b.user_id = u.user_id AND b.idempotency_key = u.idempotency_key AND b.kind = 'give_back')
            THEN 'given_back' ELSE 'spent' END,
       1, '', created_at
FROM usage_events u WHERE kind = 'use' ORDER BY id;
INSERT INTO credit_entries (namespace, user_id, product, kind, amount, used_after, spend_id, created_at)
SELECT {ns}, user_id, {product}, 'give_back', 1, used_after,
       (SELECT s.id FROM credit_entries s WHERE s.idempotency_key = u.idempotency_key
        AND s.user_id = u.user_id AND s.kind = 'spend' AND s.namespace = {ns} AND s.product = {product}),
       created_at
FROM usage_events u WHERE kind = 'give_back' ORDER BY id;
DROP TABLE usage_events;
DROP TABLE usage
"""


def _statements(script: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in script.split(";") if part.strip())


def _split(sep: str) -> dict[str, str]:
    return {
        "ns": f"CASE WHEN {sep} > 0 THEN substr(namespace, {sep} + 1) ELSE namespace END",
        "product": f"CASE WHEN {sep} > 0 THEN substr(namespace, 1, {sep} - 1) ELSE '' END",
    }


SQLITE_SCHEMA: Final = Schema(
    "ledger",
    (
        (
            *_OLD_USAGE_SQLITE,
            *_statements(
                _TABLES.format(
                    exists="IF NOT EXISTS",
                    id="INTEGER PRIMARY KEY",
                    version="",
                    without_rowid=" WITHOUT ROWID",
                )
            ),
            *_statements(_COPY.format(**_split("instr(namespace, char(31))"))),
        ),
        _entries_rebuilt(),
    ),
)

POSTGRES_SCHEMA: Final = Schema(
    "ledger",
    (
        (
            *(s.replace("WITHOUT ROWID", "") for s in _OLD_USAGE_SQLITE),
            *_statements(
                _TABLES.format(
                    exists="IF NOT EXISTS",
                    id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                    # Every write of an account moves its version (under the account's row lock),
                    # so a spend can read, choose and write in one statement that holds only if the
                    # version is still the one it read (`ledger/postgres.py`, the fast path).
                    version="\n    version   BIGINT NOT NULL DEFAULT 0,",
                    without_rowid="",
                )
            ),
            *_statements(_COPY.format(**_split("strpos(namespace, chr(31))"))),
        ),
    ),
)
