"""Windows over the stage buckets: sum a window's buckets in SQL, grouped by a key.

A window reads the minute, hour and day roll-ups that tile it (services/core/bucket_windows.py),
one statement over the three tables; the sums equal those of its minute buckets. They come back
as `StageBucket`s; `services.core.scoring.stage_stats` turns them into the figures of SPEC 6, so
the figures are defined in one place.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnCollection,
    ColumnElement,
    DateTime,
    Interval,
    Select,
    SmallInteger,
    Text,
    any_,
    bindparam,
    cast,
    func,
    literal,
    literal_column,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.core.bucket_windows import DAY, HOUR, MINUTE, Window, series_ranges
from services.core.db.stage_windows import STAGE_TABLES, has_events, signed_sum, window_rows
from services.core.scoring import GAP_HISTOGRAM_BINS, StageBucket

_COUNTS = ("events", "shortfall_events", "promise_kept_events", "negative_emotion_events")
_SUMS = (
    "expectation_sum", "expectation_sq_sum", "experience_sum", "experience_sq_sum",
    "gap_sum", "gap_sq_sum", "revenue_sum",
)  # fmt: skip
_VALUES = (*_COUNTS, *_SUMS, "gap_histogram")


def _bucket_sums(rows: ColumnCollection) -> list[ColumnElement]:
    # sum(bigint) is numeric in Postgres: cast the counts back to bigint.
    counts = [cast(signed_sum(rows, name), BigInteger).label(name) for name in _COUNTS]
    sums = [signed_sum(rows, name).label(name) for name in _SUMS]
    return [*counts, *sums, _histogram_sum(rows.gap_histogram.table.name)]


@cache
def _histogram_sum(alias: str) -> ColumnElement:
    """The histogram summed element by element (Postgres arrays are 1-based), in the same pass, as
    signed_sum does. SQL text built once: as 40 SQLAlchemy expressions it took ~3 ms of every
    request to build."""
    bins = ", ".join(
        f"coalesce(sum({alias}.sign * {alias}.gap_histogram[{i}]), 0)::bigint" for i in range(1, GAP_HISTOGRAM_BINS + 1)
    )
    return literal_column(f"ARRAY[{bins}]::bigint[]", ARRAY(BigInteger)).label("gap_histogram")


def _stage_bucket(row) -> StageBucket:
    return StageBucket(
        **{name: int(getattr(row, name)) for name in _COUNTS},
        **{name: float(getattr(row, name)) for name in _SUMS},
        gap_histogram=[int(count) for count in row.gap_histogram],
    )


def _stage_sums_statement() -> Select:
    """The sums per stage over a window, as one statement with bind parameters, built once: its
    SQL, and the server's prepared statement on each pooled connection, are reused by every request.

    A window without an end is at most three ranges (bucket_windows.window_ranges): minute rows to
    the first whole hour (or the minutes to subtract from the first hour's row: `minute_sign`
    -1), hours to the first whole day, days; hours and days come from the per-stage pre-sums
    (migration 0008), ~7 rows a day for a journey instead of one per (stage, touchpoint,
    channel). A range that is not needed is empty ([start, start))."""
    arms = []
    for granularity, (table, time_name) in STAGE_TABLES.items():
        time = table.c[time_name]
        name = time_name
        bounds = [time >= bindparam(f"{name}_start", type_=DateTime(timezone=True))]
        if granularity != DAY:
            bounds.append(time < bindparam(f"{name}_end", type_=DateTime(timezone=True)))
        sign = bindparam("minute_sign", type_=SmallInteger) if granularity == MINUTE else literal(1, SmallInteger)
        arms.append(
            select(table.c.stage, *(table.c[value] for value in _VALUES), sign.label("sign")).where(
                table.c.tenant == bindparam("tenant"),
                table.c.journey == bindparam("journey"),
                # One array parameter, whatever the number of stages: the same SQL for every journey.
                table.c.stage == any_(bindparam("stages", type_=ARRAY(Text))),
                *bounds,
            )
        )
    rows = union_all(*arms).subquery("buckets")
    return select(rows.c.stage, *_bucket_sums(rows.c)).group_by(rows.c.stage).having(has_events(rows.c))


_STAGE_SUMS = _stage_sums_statement()


def _stage_sums_parameters(tenant: str, journey: str, stages: list[str], window: Window) -> dict:
    start = window.start
    parameters = {"tenant": tenant, "journey": journey, "stages": list(stages), "minute_sign": 1}
    names = {MINUTE: "minute", HOUR: "hour", DAY: "day"}
    ranges = window.ranges()
    # The shape the statement expects: one range per granularity at most, the day range last and open.
    assert len({r.granularity for r in ranges}) == len(ranges) and ranges[-1].granularity == DAY, ranges
    for bucket_range in ranges:
        parameters[f"{names[bucket_range.granularity]}_start"] = bucket_range.start
        if bucket_range.end is not None:
            parameters[f"{names[bucket_range.granularity]}_end"] = bucket_range.end
        if bucket_range.granularity == MINUTE:
            parameters["minute_sign"] = bucket_range.sign
    for name in ("minute", "hour"):  # not needed: empty
        parameters.setdefault(f"{name}_start", start)
        parameters.setdefault(f"{name}_end", start)
    return parameters


def stage_sums_query(tenant: str, journey: str, stages: list[str], window: Window) -> Select:
    """The sums per stage over a window, with its values bound (EXPLAINed by `python -m bench --profile`)."""
    return _STAGE_SUMS.params(_stage_sums_parameters(tenant, journey, stages, window))


async def sum_by_stage(
    connection: AsyncConnection, tenant: str, journey: str, stages: list[str], window: Window
) -> dict[str, StageBucket]:
    parameters = _stage_sums_parameters(tenant, journey, stages, window)
    return {row.stage: _stage_bucket(row) for row in await connection.execute(_STAGE_SUMS, parameters)}


async def sum_by_touchpoint(
    connection: AsyncConnection, tenant: str, journey: str, stage: str, window: Window
) -> dict[tuple[str, str], StageBucket]:
    rows = window_rows(
        window.ranges(),
        ("touchpoint", "channel", *_VALUES),
        lambda table: [table.tenant == tenant, table.journey == journey, table.stage == stage],
    )
    query = (
        select(rows.c.touchpoint, rows.c.channel, *_bucket_sums(rows.c))
        .group_by(rows.c.touchpoint, rows.c.channel)
        .having(has_events(rows.c))
    )
    return {(row.touchpoint, row.channel): _stage_bucket(row) for row in await connection.execute(query)}


async def sum_by_step(
    connection: AsyncConnection, tenant: str, journey: str, stage: str, window: Window, step: timedelta
) -> dict[datetime, StageBucket]:
    """Sums per step of the window; steps start at window.start (date_bin with that origin).

    The ranges tile each step on its own, so every row read lies inside one step."""
    rows = window_rows(
        series_ranges(window.start, step, window.end),
        _VALUES,
        lambda table: [table.tenant == tenant, table.journey == journey, table.stage == stage],
    )
    step_bind = bindparam("step", step, type_=Interval)
    origin_bind = bindparam("origin", window.start, DateTime(timezone=True))
    step_start = func.date_bin(step_bind, rows.c.at, origin_bind).label("step_start")
    query = select(step_start, *_bucket_sums(rows.c)).group_by(step_start)
    return {row.step_start: _stage_bucket(row) for row in await connection.execute(query)}
