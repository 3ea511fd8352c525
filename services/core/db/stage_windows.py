"""The stage-bucket rows of a window, read from the minute, hour and day tables in one statement.

services/core/bucket_windows.py says which rows tile the window; this turns its ranges into a
UNION ALL of the three tables (each row with its start as `at`), for callers to filter, group and
sum: the API's windows and series, the scoring gauges and the stage alerts.

`stage_totals_hourly` and `stage_totals_daily` (migration 0008) hold the hour and day roll-ups
summed per stage, without touchpoint and channel, for reads that group by stage only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from sqlalchemy import (
    Column, ColumnCollection, ColumnElement, DateTime, MetaData, PrimaryKeyConstraint, SmallInteger, Subquery, Table,
    Text, and_, func, literal, or_, select, union_all,
)  # fmt: skip

from services.core.bucket_windows import DAY, HOUR, MINUTE, BucketRange
from services.core.db.schema import stage_buckets, stage_buckets_daily, stage_buckets_hourly


def _stage_totals(name: str, period: str) -> Table:
    """A roll-up summed per stage (migration 0008: kept by triggers on the roll-up)."""
    values = [
        Column(column.name, column.type, nullable=False)
        for column in stage_buckets.columns
        if column.name not in ("tenant", "journey", "stage", "minute", "touchpoint", "channel")
    ]
    return Table(
        name,
        MetaData(),  # not the schema's metadata: read here only
        Column("tenant", Text, nullable=False),
        Column("journey", Text, nullable=False),
        Column("stage", Text, nullable=False),
        Column(period, DateTime(timezone=True), nullable=False),
        *values,
        PrimaryKeyConstraint("tenant", "journey", "stage", period),
    )


stage_totals_hourly = _stage_totals("stage_totals_hourly", "hour")
stage_totals_daily = _stage_totals("stage_totals_daily", "day")

# Granularity -> the table and its time column.
TABLES = {MINUTE: (stage_buckets, "minute"), HOUR: (stage_buckets_hourly, "hour"), DAY: (stage_buckets_daily, "day")}
# The same for sums per stage only: minute rows, then the per-stage pre-sums.
STAGE_TABLES = {MINUTE: TABLES[MINUTE], HOUR: (stage_totals_hourly, "hour"), DAY: (stage_totals_daily, "day")}

Conditions = Callable[[ColumnCollection], list[ColumnElement[bool]]]


def window_rows(
    ranges: Sequence[BucketRange], columns: Sequence[str], conditions: Conditions, tables: Mapping = TABLES
) -> Subquery:
    """`columns`, `at` and `sign` of the rows in `ranges` that meet `conditions` (a function of a
    table's columns, called once per table), from `tables` (TABLES, or STAGE_TABLES for per-stage
    columns). Sum them with `signed_sum`: rows of a range with sign -1 are subtracted.

    Each range is its own condition on the time column, so the planner sees its bounds: an index
    range scan per range (a series' steps give tens of ranges; a window at most one per table)."""
    arms = []
    for granularity, (table, time_name) in tables.items():
        time = table.c[time_name]
        for sign in (1, -1):
            bounds = [
                time >= item.start if item.end is None else and_(time >= item.start, time < item.end)
                for item in ranges
                if item.granularity == granularity and item.sign == sign
            ]
            if bounds:
                arms.append(
                    select(
                        *(table.c[name] for name in columns), time.label("at"), literal(sign, SmallInteger).label("sign")
                    ).where(*conditions(table.c), or_(*bounds))
                )
    if not arms:
        raise ValueError("no ranges to read")
    return union_all(*arms).subquery("buckets")


def signed_sum(rows: ColumnCollection, name: str) -> ColumnElement:
    """sum() of a column of `window_rows`, less the rows to subtract."""
    return func.sum(rows.sign * rows[name])


def has_events(rows: ColumnCollection) -> ColumnElement[bool]:
    """For HAVING: a group with events in the window, not one whose rows were all subtracted
    again (seen only in the minutes before the window's start)."""
    return signed_sum(rows, "events") > 0
