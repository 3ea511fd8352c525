"""The stage-bucket rows of a window, read from the minute, hour and day tables in one statement.

services/core/bucket_windows.py says which rows tile the window; this turns its ranges into a
UNION ALL of the three tables (each row with its start as `at`), for callers to filter, group and
sum: the API's windows and series, the scoring gauges and the stage alerts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import ColumnCollection, ColumnElement, Subquery, and_, or_, select, union_all

from services.core.bucket_windows import DAY, HOUR, MINUTE, BucketRange
from services.core.db.schema import stage_buckets, stage_buckets_daily, stage_buckets_hourly

# Granularity -> the table and its time column.
TABLES = {MINUTE: (stage_buckets, "minute"), HOUR: (stage_buckets_hourly, "hour"), DAY: (stage_buckets_daily, "day")}

Conditions = Callable[[ColumnCollection], list[ColumnElement[bool]]]


def window_rows(ranges: Sequence[BucketRange], columns: Sequence[str], conditions: Conditions) -> Subquery:
    """`columns` and `at` of the rows in `ranges` that meet `conditions` (a function of a table's
    columns, called once per table).

    Each range is its own condition on the time column, so the planner sees its bounds: an index
    range scan per range (a series' steps give tens of ranges; a window at most one per table)."""
    arms = []
    for granularity, (table, time_name) in TABLES.items():
        time = table.c[time_name]
        bounds = [
            time >= bucket_range.start if bucket_range.end is None else and_(time >= bucket_range.start, time < bucket_range.end)
            for bucket_range in ranges
            if bucket_range.granularity == granularity
        ]
        if bounds:
            arms.append(
                select(*(table.c[name] for name in columns), time.label("at")).where(*conditions(table.c), or_(*bounds))
            )
    if not arms:
        raise ValueError("no ranges to read")
    return union_all(*arms).subquery("buckets")
