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

On PostgreSQL a spend or reservation is one call of a function the schema makes
(`credit_take_v1`): the whole transaction in one round trip.

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


# A spend or reservation on PostgreSQL, as one statement (`ledger/postgres.py`): the account's row
# locked first, then its live grants read after the lock (a volatile function's statements each
# see what was committed before them), so the writes of one account queue on that lock across
# processes, this function's and the first release's statements alike. It chooses grants in the
# spending order (`model.spending_order`), whole cost or nothing, and writes what `model`, `base`
# and `store.events` say: the grants taken from, the uses spent and the version moved, the journal
# line that is the spend's record (a key used before fails its unique index, and the caller answers
# the balance as it is), the `balance.low` / `balance.exhausted` events. `p_now` and `p_at` are the
# ledger's clock (expiry, timestamps). Outcome 0: taken, the balance after; 1: not enough, nothing
# taken, the balance; 2: not enough but the key was used before, the balance.
# A later change of what it does is a new function under a new name, so that processes still
# running this release keep calling this one.
_TAKE: Final = """
CREATE OR REPLACE FUNCTION credit_take_v1(
    p_namespace TEXT, p_user_id TEXT, p_product TEXT, p_key TEXT, p_cost BIGINT, p_state TEXT,
    p_model TEXT, p_input_tokens BIGINT, p_output_tokens BIGINT, p_tool TEXT, p_metadata TEXT,
    p_now DOUBLE PRECISION, p_at TEXT, p_signup BIGINT, p_threshold BIGINT,
    OUT r_outcome INTEGER, OUT r_free BIGINT, OUT r_credits BIGINT, OUT r_used BIGINT,
    OUT r_soonest BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
    v_used BIGINT;
    v_signed_up BOOLEAN;
    v_grant RECORD;
    v_n BIGINT;
    v_left BIGINT := p_cost;
    v_ids BIGINT[] := '{}';
    v_amounts BIGINT[] := '{}';
    v_taken TEXT := '';
    v_free BIGINT := 0;
    v_credits BIGINT := 0;
    v_soonest BIGINT;
    v_before BIGINT;
    v_after BIGINT;
    v_data TEXT;
    v_clock TIMESTAMP;
    v_created TEXT;
    v_id TEXT;
BEGIN
    SELECT a.used, a.signed_up INTO v_used, v_signed_up FROM credit_accounts a
    WHERE a.namespace = p_namespace AND a.user_id = p_user_id AND a.product = p_product
    FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO credit_accounts AS a (namespace, user_id, product, used, signed_up)
        VALUES (p_namespace, p_user_id, p_product, 0, FALSE)
        ON CONFLICT (namespace, user_id, product) DO UPDATE SET version = a.version + 1
        RETURNING a.used, a.signed_up INTO v_used, v_signed_up;
    END IF;
    IF NOT v_signed_up AND p_signup > 0 THEN
        INSERT INTO credit_grants (namespace, user_id, product, kind, source, amount, remaining, reason,
                                   created_at)
        VALUES (p_namespace, p_user_id, p_product, 'free', 'signup', p_signup,
                GREATEST(p_signup - v_used, 0), 'signup', p_at);
    END IF;
    r_free := 0;
    r_credits := 0;
    FOR v_grant IN
        SELECT g.id, g.kind, g.remaining, g.expires_at FROM credit_grants g
        WHERE g.namespace = p_namespace AND g.user_id = p_user_id AND g.product = p_product
          AND g.remaining > 0 AND (g.expires_at IS NULL OR g.expires_at > p_now)
        ORDER BY g.kind <> 'free', g.expires_at IS NULL, g.expires_at,
                 CASE g.kind WHEN 'free' THEN 0 WHEN 'promotional' THEN 1 ELSE 2 END, g.id
    LOOP
        IF v_grant.kind = 'free' THEN
            v_free := v_free + v_grant.remaining;
        ELSE
            v_credits := v_credits + v_grant.remaining;
        END IF;
        IF v_grant.expires_at < v_soonest OR v_soonest IS NULL THEN
            v_soonest := v_grant.expires_at;
        END IF;
        v_n := LEAST(v_grant.remaining, v_left);
        IF v_n > 0 THEN
            v_ids := v_ids || v_grant.id;
            v_amounts := v_amounts || v_n;
            v_left := v_left - v_n;
            v_taken := v_taken || CASE WHEN v_taken = '' THEN '' ELSE ',' END || v_grant.id || ':' || v_n;
        END IF;
        IF v_grant.remaining > v_n THEN
            IF v_grant.kind = 'free' THEN
                r_free := r_free + v_grant.remaining - v_n;
            ELSE
                r_credits := r_credits + v_grant.remaining - v_n;
            END IF;
            IF v_grant.expires_at < r_soonest OR r_soonest IS NULL THEN
                r_soonest := v_grant.expires_at;
            END IF;
        END IF;
    END LOOP;
    IF v_left > 0 THEN
        IF NOT v_signed_up THEN
            UPDATE credit_accounts SET signed_up = TRUE, version = version + 1
            WHERE namespace = p_namespace AND user_id = p_user_id AND product = p_product;
        END IF;
        r_outcome := CASE WHEN EXISTS (
            SELECT 1 FROM credit_entries e
            WHERE e.namespace = p_namespace AND e.user_id = p_user_id AND e.product = p_product
              AND e.idempotency_key = p_key
        ) THEN 2 ELSE 1 END;
        r_free := v_free;
        r_credits := v_credits;
        r_used := v_used;
        r_soonest := v_soonest;
        RETURN;
    END IF;
    r_outcome := 0;
    r_used := v_used + p_cost;
    v_before := v_free + v_credits;
    v_after := r_free + r_credits;
    INSERT INTO credit_entries (namespace, user_id, product, kind, amount, balance_after, used_after,
                                idempotency_key, state, cost, taken, model, input_tokens, output_tokens,
                                tool, metadata, created_at)
    VALUES (p_namespace, p_user_id, p_product, CASE WHEN p_state = 'spent' THEN 'spend' ELSE 'reserve' END,
            -p_cost, v_after, r_used, p_key, p_state, p_cost, v_taken, p_model, p_input_tokens,
            p_output_tokens, p_tool, p_metadata, p_at);
    FOR i IN 1 .. cardinality(v_ids) LOOP
        UPDATE credit_grants SET remaining = remaining - v_amounts[i] WHERE id = v_ids[i];
    END LOOP;
    UPDATE credit_accounts SET used = used + p_cost, signed_up = TRUE, version = version + 1
    WHERE namespace = p_namespace AND user_id = p_user_id AND product = p_product;
    IF p_product <> '' OR NOT (
        (p_threshold IS NOT NULL AND v_before > p_threshold AND p_threshold >= v_after)
        OR (v_before > 0 AND v_after = 0)
    ) THEN
        RETURN;
    END IF;
    -- The events as `store.events.add_postgres` writes them (`model.spend_events`, `base.event_data`):
    -- the data as Python's json.dumps(sort_keys=True, separators=(",", ":")); an id as random as
    -- `new_event_id`'s; the time as `datetime.isoformat` writes it (the database's clock, which the
    -- outbox's other times on PostgreSQL are too).
    v_data := '{"balance_after":' || v_after || ',"balance_before":' || v_before
        || ',"key":' || credit_json_string_v1(p_key)
        || ',"namespace":' || credit_json_string_v1(p_namespace)
        || ',"threshold":' || COALESCE(p_threshold::TEXT, 'null')
        || ',"user_id":' || credit_json_string_v1(p_user_id) || '}';
    v_clock := clock_timestamp() AT TIME ZONE 'UTC';
    v_created := to_char(v_clock, 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN date_trunc('second', v_clock) = v_clock THEN '' ELSE to_char(v_clock, '.US') END
        || '+00:00';
    IF p_threshold IS NOT NULL AND v_before > p_threshold AND p_threshold >= v_after THEN
        v_id := replace(gen_random_uuid()::TEXT, '-', '');
        INSERT INTO billing_events (event_id, kind, namespace, user_id, data, created_at)
        VALUES ('evt_' || left(v_id, 12) || right(v_id, 12), 'balance.low', p_namespace, p_user_id,
                v_data, v_created);
    END IF;
    IF v_before > 0 AND v_after = 0 THEN
        v_id := replace(gen_random_uuid()::TEXT, '-', '');
        INSERT INTO billing_events (event_id, kind, namespace, user_id, data, created_at)
        VALUES ('evt_' || left(v_id, 12) || right(v_id, 12), 'balance.exhausted', p_namespace, p_user_id,
                v_data, v_created);
    END IF;
END
$$
"""
# A string as Python's json.dumps writes it (ASCII only: others as \uXXXX, lower-case hex, a
# surrogate pair above U+FFFF), so an event written by `credit_take_v1` has the very bytes one
# written from Python has. chr(92) is a backslash, whatever `standard_conforming_strings` says.
_JSON_STRING: Final = """
CREATE OR REPLACE FUNCTION credit_json_string_v1(p_text TEXT) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    v_out TEXT := '"';
    v_char TEXT;
    v_code INTEGER;
BEGIN
    IF p_text ~ '^[ -~]*$' THEN
        RETURN to_json(p_text)::TEXT;
    END IF;
    FOREACH v_char IN ARRAY regexp_split_to_array(p_text, '') LOOP
        v_code := ascii(v_char);
        v_out := v_out || CASE
            WHEN v_char = '"' OR v_code = 92 THEN chr(92) || v_char
            WHEN v_code BETWEEN 32 AND 126 THEN v_char
            WHEN v_code = 8 THEN chr(92) || 'b'
            WHEN v_code = 9 THEN chr(92) || 't'
            WHEN v_code = 10 THEN chr(92) || 'n'
            WHEN v_code = 12 THEN chr(92) || 'f'
            WHEN v_code = 13 THEN chr(92) || 'r'
            WHEN v_code < 65536 THEN chr(92) || 'u' || lpad(to_hex(v_code), 4, '0')
            ELSE chr(92) || 'u' || to_hex(55296 + ((v_code - 65536) >> 10))
                || chr(92) || 'u' || to_hex(56320 + ((v_code - 65536) & 1023))
        END;
    END LOOP;
    RETURN v_out || '"';
END
$$
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
                    # Every write of an account moves its version (under the account's row lock):
                    # a process of the first ledger release spends in one statement that holds only
                    # if the version is still the one it read, and must keep failing when another
                    # process wrote in between (a rolling upgrade runs both).
                    version="\n    version   BIGINT NOT NULL DEFAULT 0,",
                    without_rowid="",
                )
            ),
            *_statements(_COPY.format(**_split("strpos(namespace, chr(31))"))),
        ),
        (_JSON_STRING, _TAKE),
    ),
)
