"""Per-stage pre-sums of the hour and day roll-ups, kept by statement triggers on the roll-ups

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 04:10:00

The stages endpoint (`GET /v1/journeys/{journey}/stages`) sums a window per stage only, but the
hour and day roll-ups of migration 0006 are per (stage, touchpoint, channel): a 30-day window of
a journey with 50 such keys read ~2,500 rows, each with 51 aggregates. `stage_totals_hourly` and
`stage_totals_daily` hold the same sums per (tenant, journey, stage, hour or day), so that window
reads the minute rows of its first partial hour and ~7 rows per day and per hour instead
(services/api/buckets.py).

They are kept like the roll-ups themselves: statement-level AFTER triggers with transition tables
on `stage_buckets_hourly` and `stage_buckets_daily` add the new rows and subtract the old ones per
(stage, period), in the writer's transaction, whatever writes the roll-ups (the triggers of 0006,
a back-fill, a repair); a pre-sum row whose roll-up rows are all gone is deleted; TRUNCATE of a
roll-up (which TRUNCATE of stage_buckets does) empties its pre-sum. Integer columns stay exactly
the sums of the roll-up rows, float sums to the last bits (as the roll-ups' own).

Cost: the roll-up upserts of a scoring batch now fire these triggers (see docs/performance.md),
and scoring replicas writing one stage queue on its current hour and day pre-sum rows until they
commit, as they already do on the roll-up rows of a (stage, touchpoint, channel).
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Frozen here, as the tables were on this date (services/core/scoring.py GAP_HISTOGRAM_BINS).
HISTOGRAM_BINS = 40
COUNTS = ("events", "shortfall_events", "promise_kept_events", "negative_emotion_events")
SUMS = (
    "expectation_sum", "expectation_sq_sum", "experience_sum", "experience_sq_sum",
    "gap_sum", "gap_sq_sum", "revenue_sum",
)  # fmt: skip
# (pre-sum table, the roll-up it sums, the time column of both)
PRESUMS = (("stage_totals_hourly", "stage_buckets_hourly", "hour"), ("stage_totals_daily", "stage_buckets_daily", "day"))
SIGNED_ROWS = {
    "INSERT": "SELECT 1 AS sign, * FROM new_rows",
    "UPDATE": "SELECT 1 AS sign, * FROM new_rows UNION ALL SELECT -1, * FROM old_rows",
    "DELETE": "SELECT -1 AS sign, * FROM old_rows",
}
# The (stage, period)s that may have lost their last roll-up row. The roll-ups' own updates keep
# their keys: the EXCEPT leaves nothing to look up.
VACATED = {
    "UPDATE": "SELECT {key} FROM old_rows EXCEPT SELECT {key} FROM new_rows",
    "DELETE": "SELECT DISTINCT {key} FROM old_rows",
}


def _create_table(name: str, period: str) -> None:
    op.create_table(
        name,
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("journey", sa.Text(), nullable=False),
        sa.Column("stage", sa.Text(), nullable=False),
        sa.Column(period, sa.DateTime(timezone=True), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in COUNTS),
        *(sa.Column(name, sa.Double(), nullable=False) for name in SUMS),
        sa.Column("gap_histogram", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "journey", "stage", period),
    )


def _key(period: str) -> str:
    return f"tenant, journey, stage, {period}"


def _sums(sign: str | None = None) -> str:
    """The sums of every bucket column, each term multiplied by the column `sign` if given."""
    signed = (lambda term: f"{sign} * {term}") if sign else (lambda term: term)
    counts = [f"sum({signed(name)})::bigint" for name in COUNTS]
    sums = [f"sum({signed(name)})" for name in SUMS]
    bins = ", ".join(
        f"coalesce(sum({signed(f'gap_histogram[{index}]')}), 0)::bigint" for index in range(1, HISTOGRAM_BINS + 1)
    )
    return ", ".join([*counts, *sums, f"ARRAY[{bins}]"])


def _upsert(table: str, period: str, source: str, sign: str | None = None) -> str:
    """Add the rows of `source`, summed per (stage, period), to `table`; in key order, so that
    concurrent writers lock the pre-sum rows in one order."""
    key = _key(period)
    columns = ", ".join([key, *COUNTS, *SUMS, "gap_histogram"])
    bins = ", ".join(
        f"r.gap_histogram[{index}] + EXCLUDED.gap_histogram[{index}]" for index in range(1, HISTOGRAM_BINS + 1)
    )
    added = ", ".join(f"{name} = r.{name} + EXCLUDED.{name}" for name in (*COUNTS, *SUMS))
    return (
        f"INSERT INTO {table} AS r ({columns}) SELECT {key}, {_sums(sign)} FROM {source} "
        f"GROUP BY {key} ORDER BY {key} "
        f"ON CONFLICT ({key}) DO UPDATE SET {added}, gap_histogram = ARRAY[{bins}]"
    )


def _drop_emptied(table: str, rollup: str, period: str, vacated: str) -> str:
    """Delete the pre-sum rows of `vacated` left without roll-up rows: the stages endpoint must
    not see a row for a stage and period that no longer has buckets."""
    return (
        f"DELETE FROM {table} AS r USING ({vacated}) AS v "
        f"WHERE r.tenant = v.tenant AND r.journey = v.journey AND r.stage = v.stage AND r.{period} = v.{period} "
        f"AND NOT EXISTS (SELECT FROM {rollup} AS b WHERE b.tenant = r.tenant AND b.journey = r.journey "
        f"AND b.stage = r.stage AND b.{period} = r.{period})"
    )


def _trigger_function(table: str, rollup: str, period: str) -> str:
    branches = []
    for operation, rows in SIGNED_ROWS.items():
        # plpgsql plans a branch when it first runs it, so each names only its own transition tables.
        source = "new_rows" if operation == "INSERT" else f"({rows}) AS d"
        statements = [_upsert(table, period, source, None if operation == "INSERT" else "sign")]
        if operation in VACATED:
            statements.append(_drop_emptied(table, rollup, period, VACATED[operation].format(key=_key(period))))
        branches.append(f"IF TG_OP = '{operation}' THEN\n        " + ";\n        ".join(statements) + ";\n    END IF;")
    body = "\n    ".join(branches)
    return (
        f"CREATE FUNCTION {table}_add() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN\n    {body}\n    RETURN NULL;\nEND\n$$"
    )


def upgrade() -> None:
    for table, rollup, period in PRESUMS:
        _create_table(table, period)
        op.execute(_trigger_function(table, rollup, period))
        op.execute(
            f"CREATE FUNCTION {table}_truncate() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN\n    TRUNCATE {table};\n    RETURN NULL;\nEND\n$$"
        )
        # Creating the triggers locks the roll-up against writes until this migration commits, so
        # the back-fill below and the triggers see the same roll-up rows.
        for event, transition in (
            ("insert", "NEW TABLE AS new_rows"),
            ("update", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
            ("delete", "OLD TABLE AS old_rows"),
        ):
            op.execute(
                f"CREATE TRIGGER {table}_{event} AFTER {event.upper()} ON {rollup} "
                f"REFERENCING {transition} FOR EACH STATEMENT EXECUTE FUNCTION {table}_add()"
            )
        op.execute(
            f"CREATE TRIGGER {table}_truncate AFTER TRUNCATE ON {rollup} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_truncate()"
        )
        op.execute(_upsert(table, period, rollup))  # back-fill


def downgrade() -> None:
    for table, rollup, _ in PRESUMS:
        for event in ("insert", "update", "delete", "truncate"):
            op.execute(f"DROP TRIGGER {table}_{event} ON {rollup}")
        op.execute(f"DROP FUNCTION {table}_truncate()")
        op.execute(f"DROP FUNCTION {table}_add()")
        op.drop_table(table)
