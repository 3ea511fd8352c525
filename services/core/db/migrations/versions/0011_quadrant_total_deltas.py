"""Quadrant totals without a per-tenant lock: the triggers append deltas, folded by whoever is free

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25 00:40:00

Migration 0007's triggers added each statement's rows to the tenant's few `quadrant_totals` rows
in place, under a per-tenant advisory lock held until the writer committed. Every writer of a
tenant's customers (scoring's consumer-group members, the quadrant sweep) queued there, from its
customer upsert to its commit: two scoring processes of two members each spent 42 % of their
backends' active samples waiting for that lock (docs/performance.md).

Now the triggers only append: one `quadrant_total_deltas` row per (tenant, latest journey,
quadrant, band) that a statement changed, with the same exact integer terms as before. An append
takes no row lock, so no writer waits for another. The deltas are folded into `quadrant_totals`
at the end of the same trigger, if no other transaction is folding (`pg_try_advisory_xact_lock`,
which never waits): the folder moves every delta that has committed, or is its own, into the
totals and drops the bands left without customers. Only folders write the totals, one at a time.

Reads take `quadrant_totals_live`: the totals plus the deltas not folded yet, summed per band in
one snapshot, so they are exact whether or not a fold has run. Sums stay exact (bigint and
numeric), so folding in any order and at any time gives the totals 0007 kept.

The old lock also kept two scoring batches of a tenant from deadlocking in the stage buckets'
roll-up triggers (0006), which it serialized since the customers come first in a batch. Scoring
now takes a per-tenant lock of its own right before its bucket upsert (services/scoring/store.py,
BUCKETS_LOCK_CLASS), so members of a tenant queue from there to their commit, not from their
customers upsert on.
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def _sibling(name: str):
    """Another version file, loaded by path as alembic loads them (they are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_cem_migration_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The terms must be 0007's exactly: the totals it stored are added to and subtracted from.
_previous = _sibling("0007_quadrant_totals")
KEY = _previous.KEY
SIGNED_ROWS = _previous.SIGNED_ROWS
aggregate = _previous._aggregate
# pg_try_advisory_xact_lock(class, 0): 'CQF', the fold; 0007's 'CQT' is no longer taken.
FOLD_LOCK_CLASS = 0x435146
DELTA_COLUMNS = f"{KEY}, customers, index_units, revenue_units"
NONZERO = "customers <> 0 OR index_units <> 0 OR revenue_units <> 0"

# Every delta this transaction can see (committed, or its own) into the totals, summed per band;
# then the bands left without customers (exactly 0 in every sum) are dropped.
FOLD = (
    "WITH taken AS (DELETE FROM quadrant_total_deltas RETURNING *), "
    "changed AS ("
    f"INSERT INTO quadrant_totals AS t ({DELTA_COLUMNS}) "
    f"SELECT {KEY}, sum(customers)::bigint, sum(index_units), sum(revenue_units) FROM taken "
    f"GROUP BY {KEY} HAVING sum(customers) <> 0 OR sum(index_units) <> 0 OR sum(revenue_units) <> 0 "
    f"ON CONFLICT ({KEY}) DO UPDATE SET customers = t.customers + EXCLUDED.customers, "
    "index_units = t.index_units + EXCLUDED.index_units, revenue_units = t.revenue_units + EXCLUDED.revenue_units "
    "RETURNING t.tenant, t.customers) "
    "SELECT array_agg(DISTINCT tenant) FILTER (WHERE customers = 0) INTO emptied FROM changed"
)
DROP_EMPTIED = "DELETE FROM quadrant_totals WHERE tenant = ANY(emptied) AND customers = 0"


def _trigger_function() -> str:
    branches = []
    for operation, rows in SIGNED_ROWS.items():
        # plpgsql plans a branch when it first runs it, so each names only its own transition tables.
        append = (
            f"INSERT INTO quadrant_total_deltas ({DELTA_COLUMNS}) "
            f"SELECT * FROM ({aggregate(rows, 'c.sign')}) AS d ({DELTA_COLUMNS}) WHERE {NONZERO}"
        )
        branches.append(f"IF TG_OP = '{operation}' THEN\n        {append};\n    END IF;")
    body = "\n    ".join(branches)
    return (
        "CREATE OR REPLACE FUNCTION quadrant_totals_apply() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "DECLARE\n    emptied text[];\n"
        f"BEGIN\n    {body}\n"
        # Another transaction folding holds the lock until it commits: leave ours to the next fold.
        f"    IF pg_try_advisory_xact_lock({FOLD_LOCK_CLASS}, 0) THEN\n"
        f"        {FOLD};\n"
        "        IF emptied IS NOT NULL THEN\n"
        f"            {DROP_EMPTIED};\n"
        "        END IF;\n"
        "    END IF;\n"
        "    RETURN NULL;\nEND\n$$"
    )


def _rebuild_function() -> str:
    # SHARE ROW EXCLUSIVE: no customer is written while the totals are recomputed (reads go on);
    # then the fold lock, which a writer may still hold until it commits.
    return (
        "CREATE OR REPLACE FUNCTION quadrant_totals_rebuild() RETURNS void LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "    LOCK TABLE customers IN SHARE ROW EXCLUSIVE MODE;\n"
        f"    PERFORM pg_advisory_xact_lock({FOLD_LOCK_CLASS}, 0);\n"
        "    DELETE FROM quadrant_total_deltas;\n"
        "    DELETE FROM quadrant_totals;\n"
        f"    INSERT INTO quadrant_totals ({DELTA_COLUMNS}) {aggregate('SELECT * FROM customers', '1')};\n"
        "END\n$$"
    )


def upgrade() -> None:
    # The totals' columns (and NOT NULLs), without their key: rows are only appended and taken
    # whole by the fold.
    op.execute("CREATE TABLE quadrant_total_deltas (LIKE quadrant_totals)")
    op.execute(
        "CREATE VIEW quadrant_totals_live AS "
        f"SELECT {KEY}, sum(customers)::bigint AS customers, sum(index_units) AS index_units, "
        "sum(revenue_units) AS revenue_units FROM ("
        f"SELECT {DELTA_COLUMNS} FROM quadrant_totals UNION ALL SELECT {DELTA_COLUMNS} FROM quadrant_total_deltas"
        f") AS parts GROUP BY {KEY} "
        "HAVING sum(customers) <> 0 OR sum(index_units) <> 0 OR sum(revenue_units) <> 0"
    )
    op.execute(_trigger_function())
    op.execute(_rebuild_function())
    op.execute(
        "CREATE OR REPLACE FUNCTION quadrant_totals_truncate() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n    TRUNCATE quadrant_totals, quadrant_total_deltas;\n    RETURN NULL;\nEND\n$$"
    )


def downgrade() -> None:
    # 0007's functions, after folding what is pending into the totals they keep in place.
    op.execute("LOCK TABLE customers IN SHARE ROW EXCLUSIVE MODE")
    op.execute(f"SELECT pg_advisory_xact_lock({FOLD_LOCK_CLASS}, 0)")
    op.execute(
        f"DO $$ DECLARE emptied text[]; BEGIN {FOLD}; IF emptied IS NOT NULL THEN {DROP_EMPTIED}; END IF; END $$"
    )
    op.execute(_previous._trigger_function().replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    op.execute(_previous._rebuild_function().replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    op.execute(
        "CREATE OR REPLACE FUNCTION quadrant_totals_truncate() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n    TRUNCATE quadrant_totals;\n    RETURN NULL;\nEND\n$$"
    )
    op.execute("DROP VIEW quadrant_totals_live")
    op.drop_table("quadrant_total_deltas")
