"""Windows over the stage buckets: sum a window's minute buckets in SQL, grouped by a key.

The sums come back as `StageBucket`s; `services.core.scoring.stage_stats` turns them into the
figures of SPEC 6, so the figures are defined in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ARRAY, BigInteger, ColumnElement, DateTime, Interval, bindparam, cast, func, select
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.ext.asyncio import AsyncConnection

from services.core.db.schema import stage_buckets
from services.core.scoring import GAP_HISTOGRAM_BINS, StageBucket

_COUNTS = ("events", "shortfall_events", "promise_kept_events", "negative_emotion_events")
_SUMS = (
    "expectation_sum", "expectation_sq_sum", "experience_sum", "experience_sq_sum",
    "gap_sum", "gap_sq_sum", "revenue_sum",
)  # fmt: skip


def _bucket_sums() -> list[ColumnElement]:
    table = stage_buckets.c
    # sum(bigint) is numeric in Postgres: cast the counts back to bigint.
    counts = [cast(func.sum(table[name]), BigInteger).label(name) for name in _COUNTS]
    sums = [func.sum(table[name]).label(name) for name in _SUMS]
    # The histogram element by element (Postgres arrays are 1-based), in the same single pass.
    bins = [
        cast(func.coalesce(func.sum(table.gap_histogram[index]), 0), BigInteger)
        for index in range(1, GAP_HISTOGRAM_BINS + 1)
    ]
    histogram = cast(array(bins), ARRAY(BigInteger)).label("gap_histogram")
    return [*counts, *sums, histogram]


def _stage_bucket(row) -> StageBucket:
    return StageBucket(
        **{name: int(getattr(row, name)) for name in _COUNTS},
        **{name: float(getattr(row, name)) for name in _SUMS},
        gap_histogram=[int(count) for count in row.gap_histogram],
    )


@dataclass(frozen=True)
class Window:
    """The buckets whose minute is >= start; no upper bound, as events may be up to 5 min ahead."""

    start: datetime
    end: datetime  # query time, reported as `to`

    @staticmethod
    def ending_at(now: datetime, length: timedelta) -> Window:
        start = (now - length).replace(second=0, microsecond=0)  # date_trunc('minute', now - window)
        return Window(start=start, end=now)


async def sum_by_stage(
    connection: AsyncConnection, tenant: str, journey: str, stages: list[str], window: Window
) -> dict[str, StageBucket]:
    table = stage_buckets.c
    # Naming the stages lets the primary key (tenant, journey, stage, minute, ...) bound the minutes
    # of each stage, instead of reading every minute of the journey.
    query = (
        select(table.stage, *_bucket_sums())
        .where(table.tenant == tenant, table.journey == journey, table.stage.in_(stages), table.minute >= window.start)
        .group_by(table.stage)
    )
    return {row.stage: _stage_bucket(row) for row in await connection.execute(query)}


async def sum_by_touchpoint(
    connection: AsyncConnection, tenant: str, journey: str, stage: str, window: Window
) -> dict[tuple[str, str], StageBucket]:
    table = stage_buckets.c
    query = (
        select(table.touchpoint, table.channel, *_bucket_sums())
        .where(table.tenant == tenant, table.journey == journey, table.stage == stage, table.minute >= window.start)
        .group_by(table.touchpoint, table.channel)
    )
    return {(row.touchpoint, row.channel): _stage_bucket(row) for row in await connection.execute(query)}


async def sum_by_step(
    connection: AsyncConnection, tenant: str, journey: str, stage: str, window: Window, step: timedelta
) -> dict[datetime, StageBucket]:
    """Sums per step of the window; steps start at window.start (date_bin with that origin)."""
    table = stage_buckets.c
    step_bind = bindparam("step", step, type_=Interval)
    origin_bind = bindparam("origin", window.start, DateTime(timezone=True))
    step_start = func.date_bin(step_bind, table.minute, origin_bind).label("step_start")
    query = (
        select(step_start, *_bucket_sums())
        .where(table.tenant == tenant, table.journey == journey, table.stage == stage, table.minute >= window.start)
        .group_by(step_start)
    )
    return {row.step_start: _stage_bucket(row) for row in await connection.execute(query)}
