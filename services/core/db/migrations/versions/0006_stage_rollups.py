"""Hour and day roll-ups of the stage buckets, kept by statement triggers on stage_buckets

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 01:05:00

Windows of days summed ~2,900 minute rows per bucket key (2.3 s over 30 days at 3 M events);
`stage_buckets_hourly` and `stage_buckets_daily` hold the same sums per UTC hour and day, so a
window reads at most ~60 minute, ~23 hour and one row per day per key (services/core/bucket_windows.py).

They are maintained inside the writer's transaction by statement-level AFTER triggers with
transition tables: whatever writes stage_buckets (INSERT, INSERT ... ON CONFLICT DO UPDATE, whose
inserted rows reach the INSERT trigger and updated rows the UPDATE trigger, COPY, UPDATE, DELETE),
the new rows are added and the old rows subtracted, per (key, hour) and per (key, day). Integer
columns stay exactly equal to the sum of the minute rows; the float sums to the last bits.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Frozen here, as the tables were on this date (services/core/scoring.py GAP_HISTOGRAM_BINS).
HISTOGRAM_BINS = 40
KEY = ("tenant", "journey", "stage", "touchpoint", "channel")
COUNTS = ("events", "shortfall_events", "promise_kept_events", "negative_emotion_events")
SUMS = (
    "expectation_sum", "expectation_sq_sum", "experience_sum", "experience_sq_sum",
    "gap_sum", "gap_sq_sum", "revenue_sum",
)  # fmt: skip
ROLLUPS = (("stage_buckets_hourly", "hour", "1 hour"), ("stage_buckets_daily", "day", "1 day"))
INTERVALS = {period: interval for _, period, interval in ROLLUPS}
# date_bin from a UTC midnight: UTC hours and days whatever the session's time zone.
ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"
SIGNED_ROWS = {
    "INSERT": "SELECT 1 AS sign, * FROM new_rows",
    "UPDATE": "SELECT 1 AS sign, * FROM new_rows UNION ALL SELECT -1, * FROM old_rows",
    "DELETE": "SELECT -1 AS sign, * FROM old_rows",
}
# The (key, minute)s that may have left a roll-up row without minute rows. Scoring's updates keep
# their keys: the EXCEPT leaves nothing to look up.
VACATED = {
    "UPDATE": "SELECT {key}, minute FROM old_rows EXCEPT SELECT {key}, minute FROM new_rows",
    "DELETE": "SELECT {key}, minute FROM old_rows",
}


def _create_table(name: str, period: str) -> None:
    op.create_table(
        name,
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("journey", sa.Text(), nullable=False),
        sa.Column("stage", sa.Text(), nullable=False),
        sa.Column(period, sa.DateTime(timezone=True), nullable=False),
        sa.Column("touchpoint", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("expectation_sum", sa.Double(), nullable=False),
        sa.Column("expectation_sq_sum", sa.Double(), nullable=False),
        sa.Column("experience_sum", sa.Double(), nullable=False),
        sa.Column("experience_sq_sum", sa.Double(), nullable=False),
        sa.Column("gap_sum", sa.Double(), nullable=False),
        sa.Column("gap_sq_sum", sa.Double(), nullable=False),
        sa.Column("shortfall_events", sa.BigInteger(), nullable=False),
        sa.Column("promise_kept_events", sa.BigInteger(), nullable=False),
        sa.Column("negative_emotion_events", sa.BigInteger(), nullable=False),
        sa.Column("revenue_sum", sa.Double(), nullable=False),
        sa.Column("gap_histogram", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "journey", "stage", period, "touchpoint", "channel"),
    )


def _key(period: str, time: str | None = None) -> str:
    """The key columns in primary-key order, the period (`time` binned to it, if given) fourth:
    grouping and upserting in the order of the keys' indexes."""
    period_column = period if time is None else f"date_bin('{INTERVALS[period]}', {time}, {ORIGIN}) AS {period}"
    return ", ".join([*KEY[:3], period_column, *KEY[3:]])


def _sums(sign: str | None = None) -> str:
    """The sums of every bucket column, each term multiplied by the column `sign` if given."""
    signed = (lambda term: f"{sign} * {term}") if sign else (lambda term: term)
    counts = [f"sum({signed(name)})::bigint AS {name}" for name in COUNTS]
    sums = [f"sum({signed(name)}) AS {name}" for name in SUMS]
    bins = ", ".join(
        f"coalesce(sum({signed(f'gap_histogram[{index}]')}), 0)::bigint" for index in range(1, HISTOGRAM_BINS + 1)
    )
    return ", ".join([*counts, *sums, f"ARRAY[{bins}] AS gap_histogram"])


def _upsert(table: str, period: str, source: str, time: str) -> str:
    """Add the rows of `source` (times in `time`), summed per key and `period`, to `table`.

    Ordered by key: concurrent scoring transactions then lock the roll-up rows in one order (after
    their minute rows, also taken in one order), so they wait for each other but cannot deadlock."""
    columns = ", ".join([_key(period), *COUNTS, *SUMS, "gap_histogram"])
    key = _key(period)
    bins = ", ".join(
        f"r.gap_histogram[{index}] + EXCLUDED.gap_histogram[{index}]" for index in range(1, HISTOGRAM_BINS + 1)
    )
    added = ", ".join(f"{name} = r.{name} + EXCLUDED.{name}" for name in (*COUNTS, *SUMS))
    return (
        f"INSERT INTO {table} AS r ({columns}) "
        f"SELECT {_key(period, time)}, {_sums()} "
        f"FROM {source} GROUP BY {key} ORDER BY {key} "
        f"ON CONFLICT ({key}) DO UPDATE SET {added}, gap_histogram = ARRAY[{bins}]"
    )


def _drop_emptied(table: str, period: str, vacated: str) -> str:
    """Delete the roll-up rows of `vacated` left without minute rows: a window that reads them must
    not list a key the minute rows no longer have (their sums are zero already)."""
    key_match = " AND ".join(f"r.{name} = v.{name}" for name in KEY)
    minute_match = " AND ".join(f"m.{name} = r.{name}" for name in KEY)
    return (
        f"DELETE FROM {table} AS r USING (SELECT DISTINCT {_key(period, 'minute')} FROM ({vacated}) AS s) AS v "
        f"WHERE {key_match} AND r.{period} = v.{period} AND NOT EXISTS (SELECT FROM stage_buckets AS m "
        f"WHERE {minute_match} AND m.minute >= r.{period} AND m.minute < r.{period} + interval '{INTERVALS[period]}')"
    )


def _trigger_function() -> str:
    (hourly, hour, _), (daily, day, _) = ROLLUPS
    branches = []
    for operation, rows in SIGNED_ROWS.items():
        # The hour deltas once, then the day deltas from them (~60x fewer rows than the minutes).
        # plpgsql plans a branch when it first runs it, so each names only its own transition tables.
        statement = (
            f"WITH hour_deltas AS MATERIALIZED (SELECT {_key(hour, 'minute')}, {_sums('sign')} "
            f"FROM ({rows}) AS d GROUP BY 1, 2, 3, 4, 5, 6), "
            f"added_hours AS ({_upsert(hourly, hour, 'hour_deltas', hour)}) "
            f"{_upsert(daily, day, 'hour_deltas', hour)}"
        )
        statements = [statement]
        if operation in VACATED:
            vacated = VACATED[operation].format(key=", ".join(KEY))
            statements += [_drop_emptied(table, period, vacated) for table, period, _ in ROLLUPS]
        branches.append(f"IF TG_OP = '{operation}' THEN\n        " + ";\n        ".join(statements) + ";\n    END IF;")
    body = "\n    ".join(branches)
    return (
        "CREATE FUNCTION stage_buckets_roll_up() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN\n    {body}\n    RETURN NULL;\nEND\n$$"
    )


def upgrade() -> None:
    for table, period, _ in ROLLUPS:
        _create_table(table, period)
    op.execute(_trigger_function())
    op.execute(
        "CREATE FUNCTION stage_buckets_truncate_roll_ups() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n    TRUNCATE stage_buckets_hourly, stage_buckets_daily;\n    RETURN NULL;\nEND\n$$"
    )
    # A trigger with transition tables takes one event, hence one per event. Creating them locks
    # stage_buckets against writes until this migration commits, so the back-fill below and the
    # triggers see the same minute rows: none is counted twice or missed.
    op.execute(
        "CREATE TRIGGER stage_buckets_roll_up_insert AFTER INSERT ON stage_buckets "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION stage_buckets_roll_up()"
    )
    op.execute(
        "CREATE TRIGGER stage_buckets_roll_up_update AFTER UPDATE ON stage_buckets "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION stage_buckets_roll_up()"
    )
    op.execute(
        "CREATE TRIGGER stage_buckets_roll_up_delete AFTER DELETE ON stage_buckets "
        "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION stage_buckets_roll_up()"
    )
    op.execute(
        "CREATE TRIGGER stage_buckets_roll_up_truncate AFTER TRUNCATE ON stage_buckets "
        "FOR EACH STATEMENT EXECUTE FUNCTION stage_buckets_truncate_roll_ups()"
    )
    # Back-fill: the hours from the minutes, the days from the hours.
    op.execute(_upsert("stage_buckets_hourly", "hour", "stage_buckets", "minute"))
    op.execute(_upsert("stage_buckets_daily", "day", "stage_buckets_hourly", "hour"))


def downgrade() -> None:
    for event in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER stage_buckets_roll_up_{event} ON stage_buckets")
    op.execute("DROP FUNCTION stage_buckets_truncate_roll_ups()")
    op.execute("DROP FUNCTION stage_buckets_roll_up()")
    op.drop_table("stage_buckets_daily")
    op.drop_table("stage_buckets_hourly")
