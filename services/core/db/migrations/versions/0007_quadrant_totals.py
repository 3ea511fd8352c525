"""Per-quadrant totals for the positioning map, kept by statement triggers on customers

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 01:05:00

The positioning map summed the revenue of every customer valued at query time: a scan of all
customers with power() per row (0.7 s at 1 M). `quadrant_totals` holds, per (tenant, latest
journey, quadrant, revenue band), the customer count, the sum of experience indexes and the
revenue in a time-invariant form, so the map reads a handful of rows (services/api/positioning.py).

Revenue. A customer's revenue at time t is 2 ** (revenue_rank - t / half_life) (revenue_rank is
log2 of the revenue valued at the epoch), too large a number to keep as such (t / half_life is
~230 for 90 days, millions for a half-life of seconds). Each customer is put in the band
floor(revenue_rank / 16) and adds round(2 ** (revenue_rank - 16 * band + 46)), an integer in
[2 ** 46, 2 ** 62], to its band's `revenue_units`; a band is worth
revenue_units * 2 ** (16 * band - 46 - t / half_life). A band depends only on the customer's own
rank, so nothing is ever rebased, whatever the half-life and however long the service runs.
Customers without revenue (rank -1e300) add 0. Experience indexes (means of gaps, within
[-10, 10]) are added as round(index * 2 ** 40) to `index_units`.

No drift. The terms are integers, summed in bigint/numeric, where addition and subtraction are
exact; a customer's terms are a deterministic function of its row, so removing a row subtracts
exactly what adding it added: the totals equal the sum over the current rows, whatever the history
of updates, and a band whose last customer left is 0 exactly (its row is deleted). The only
rounding is each term's own: relative 2 ** -47 (7e-15) of a revenue, 2 ** -41 (5e-13) absolute of
an index. (Fixed point rather than numeric casts of the floats: a third of the trigger's cost.)
`quadrant_totals_rebuild()` recomputes everything from customers (the back-fill below; a repair
after writes with the triggers disabled, or a change of the server's maths library).

They are maintained inside the writer's transaction by statement-level AFTER triggers with
transition tables: whatever writes customers (INSERT, INSERT ... ON CONFLICT DO UPDATE, whose
inserted rows reach the INSERT trigger and updated rows the UPDATE trigger, COPY, UPDATE of the
quadrant sweep, DELETE), the new rows are added and the old rows subtracted, one upsert per
statement; TRUNCATE empties the totals. The cost: concurrent writers of one tenant's customers
(scoring replicas, the sweep) queue on the tenant's few totals rows from their customer write to
their commit, in order of a per-tenant advisory lock so that they never deadlock on them.
"""

from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Frozen here (services/core/revenue.py reads the units with the same constants).
BAND_BITS = 16
REVENUE_UNIT_BITS = 46
INDEX_UNIT_BITS = 40
KEY = "tenant, latest_journey, quadrant, band"
SIGNED_ROWS = {
    "INSERT": "SELECT 1 AS sign, * FROM new_rows",
    "UPDATE": "SELECT 1 AS sign, * FROM new_rows UNION ALL SELECT -1, * FROM old_rows",
    "DELETE": "SELECT -1 AS sign, * FROM old_rows",
}
# pg_advisory_xact_lock(class, hashtext(tenant)): 'CQT', apart from services/core/db/alerts.py's.
LOCK_CLASS = 0x435154
# revenue_rank is -1e300 for customers without revenue (services/core/scoring.py revenue_rank).
HAS_REVENUE = "c.revenue_rank > -1e299"


def _aggregate(rows: str, sign: str) -> str:
    """(KEY, customers, index_units, revenue_units) of `rows` (columns of customers), each row
    counted `sign` times. rank - 16 * floor(rank / 16) is exact in binary floating point; sum() of
    bigint is exact (numeric)."""
    return (
        f"SELECT c.tenant, c.latest_journey, c.quadrant, b.band, sum({sign})::bigint, "
        f"sum({sign} * round(c.experience_index * {2 ** INDEX_UNIT_BITS}.0)::bigint), "
        f"sum({sign} * CASE WHEN {HAS_REVENUE} THEN round(power(2.0::float8, "
        f"c.revenue_rank - {BAND_BITS}.0 * b.band + {REVENUE_UNIT_BITS}))::bigint ELSE 0 END) "
        f"FROM ({rows}) AS c CROSS JOIN LATERAL (SELECT CASE WHEN {HAS_REVENUE} "
        f"THEN floor(c.revenue_rank / {BAND_BITS}.0)::bigint ELSE 0 END AS band) AS b "
        f"GROUP BY 1, 2, 3, 4"
    )


def _trigger_function() -> str:
    branches = []
    for operation, rows in SIGNED_ROWS.items():
        # Ordered by key: concurrent writers lock the totals rows in one order (after their
        # customer rows), so they wait for each other but do not deadlock within a statement.
        # Keys whose delta is nil (an update that moved nothing) are left alone: no lock taken.
        statement = (
            "WITH changed AS ("
            f"INSERT INTO quadrant_totals AS t ({KEY}, customers, index_units, revenue_units) "
            f"SELECT * FROM ({_aggregate(rows, 'c.sign')}) AS d (tenant, latest_journey, quadrant, band, "
            "customers, index_units, revenue_units) "
            "WHERE customers <> 0 OR index_units <> 0 OR revenue_units <> 0 "
            f"ORDER BY {KEY} "
            f"ON CONFLICT ({KEY}) DO UPDATE SET customers = t.customers + EXCLUDED.customers, "
            "index_units = t.index_units + EXCLUDED.index_units, "
            "revenue_units = t.revenue_units + EXCLUDED.revenue_units "
            "RETURNING t.tenant, t.customers) "
            "SELECT array_agg(DISTINCT tenant) FILTER (WHERE customers = 0) INTO emptied FROM changed"
        )
        # One statement fires the INSERT and the UPDATE triggers (ON CONFLICT DO UPDATE), each
        # locking its keys in order, but not in one order together: two writers of a tenant could
        # each hold a key the other's second trigger wants. A lock per tenant, taken first and in
        # tenant order, makes them queue instead (as they would on the totals rows anyway).
        lock = (
            f"PERFORM pg_advisory_xact_lock({LOCK_CLASS}, hashtext(tenant)) "
            f"FROM (SELECT DISTINCT tenant FROM ({rows}) AS c ORDER BY tenant) AS t"
        )
        # plpgsql plans a branch when it first runs it, so each names only its own transition tables.
        branches.append(f"IF TG_OP = '{operation}' THEN\n        {lock};\n        {statement};\n    END IF;")
    body = "\n    ".join(branches)
    # A band left without customers sums to 0 exactly: drop its row, so rows do not pile up as
    # the bands move on with time (one new band per 16 half-lives).
    return (
        "CREATE FUNCTION quadrant_totals_apply() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "DECLARE\n    emptied text[];\n"
        f"BEGIN\n    {body}\n"
        "    IF emptied IS NOT NULL THEN\n"
        "        DELETE FROM quadrant_totals WHERE tenant = ANY(emptied) AND customers = 0;\n"
        "    END IF;\n"
        "    RETURN NULL;\nEND\n$$"
    )


def _rebuild_function() -> str:
    # SHARE ROW EXCLUSIVE: no customer is written while the totals are recomputed (reads go on).
    return (
        "CREATE FUNCTION quadrant_totals_rebuild() RETURNS void LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "    LOCK TABLE customers IN SHARE ROW EXCLUSIVE MODE;\n"
        "    DELETE FROM quadrant_totals;\n"
        f"    INSERT INTO quadrant_totals ({KEY}, customers, index_units, revenue_units) "
        f"{_aggregate('SELECT * FROM customers', '1')};\n"
        "END\n$$"
    )


def upgrade() -> None:
    op.create_table(
        "quadrant_totals",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("latest_journey", sa.Text(), nullable=False),
        sa.Column("quadrant", sa.Text(), nullable=False),
        sa.Column("band", sa.BigInteger(), nullable=False),
        sa.Column("customers", sa.BigInteger(), nullable=False),
        sa.Column("index_units", sa.Numeric(), nullable=False),
        sa.Column("revenue_units", sa.Numeric(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "latest_journey", "quadrant", "band"),
    )
    op.execute(_trigger_function())
    op.execute(_rebuild_function())
    op.execute(
        "CREATE FUNCTION quadrant_totals_truncate() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n    TRUNCATE quadrant_totals;\n    RETURN NULL;\nEND\n$$"
    )
    # A trigger with transition tables takes one event, hence one per event. Creating them locks
    # customers against writes until this migration commits, so the back-fill below and the
    # triggers see the same rows: none is counted twice or missed.
    op.execute(
        "CREATE TRIGGER quadrant_totals_insert AFTER INSERT ON customers "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION quadrant_totals_apply()"
    )
    op.execute(
        "CREATE TRIGGER quadrant_totals_update AFTER UPDATE ON customers "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION quadrant_totals_apply()"
    )
    op.execute(
        "CREATE TRIGGER quadrant_totals_delete AFTER DELETE ON customers "
        "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION quadrant_totals_apply()"
    )
    op.execute(
        "CREATE TRIGGER quadrant_totals_truncate AFTER TRUNCATE ON customers "
        "FOR EACH STATEMENT EXECUTE FUNCTION quadrant_totals_truncate()"
    )
    op.execute("SELECT quadrant_totals_rebuild()")


def downgrade() -> None:
    for event in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER quadrant_totals_{event} ON customers")
    op.execute("DROP FUNCTION quadrant_totals_truncate()")
    op.execute("DROP FUNCTION quadrant_totals_rebuild()")
    op.execute("DROP FUNCTION quadrant_totals_apply()")
    op.drop_table("quadrant_totals")
