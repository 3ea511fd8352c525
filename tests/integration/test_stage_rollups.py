"""Stage windows read from the hour and day roll-ups (migration 0006) equal the minute buckets' sums.

Random writes to stage_buckets, in the shapes its writers use (the scoring upsert INSERT ... ON
CONFLICT DO UPDATE with new and existing rows, COPY, UPDATE, DELETE), several statements, over a
few days of minutes; then random windows and series steps read through the API's functions must
give what summing the minute rows alone gives. Every value is a multiple of 1/4 well inside 2**53,
so float sums are exact in any order and the comparison is exact.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.buckets import sum_by_stage, sum_by_step, sum_by_touchpoint
from services.core.bucket_windows import Window
from services.core.db.engine import create_engine
from services.core.scoring import GAP_HISTOGRAM_BINS, StageBucket
from services.scoring.alerts import load_stage_windows

pytestmark = pytest.mark.integration

# A day boundary two days in: windows start in the minutes, hours and days around it.
BASE = datetime(2026, 11, 22, 21, 17, tzinfo=timezone.utc)
SPAN_MINUTES = 4 * 1440
JOURNEY = "j"
STAGES = ("s1", "s2")
TOUCHPOINTS = ("", "desk")
CHANNELS = ("", "app")
COUNTS = ("events", "shortfall_events", "promise_kept_events", "negative_emotion_events")
SUMS = (
    "expectation_sum", "expectation_sq_sum", "experience_sum", "experience_sq_sum",
    "gap_sum", "gap_sq_sum", "revenue_sum",
)  # fmt: skip
KEY = ("journey", "stage", "minute", "touchpoint", "channel")
COLUMNS = (*KEY, *COUNTS, *SUMS, "gap_histogram")
# The shape of the scoring upsert (services/scoring/store.py): unnest arrays, ON CONFLICT DO UPDATE
# adding the sums and the histograms element by element.
UPSERT = (
    f"INSERT INTO stage_buckets AS b (tenant, {', '.join(COLUMNS)}) SELECT $1, {', '.join(COLUMNS[:-1])}, "
    "CAST(histogram AS bigint[]) FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], "
    + ", ".join(f"${index + 7}::bigint[]" for index in range(len(COUNTS)))
    + ", "
    + ", ".join(f"${index + 7 + len(COUNTS)}::float8[]" for index in range(len(SUMS)))
    + f", ${7 + len(COUNTS) + len(SUMS)}::text[]) AS u({', '.join(COLUMNS[:-1])}, histogram) "
    "ON CONFLICT (tenant, journey, stage, minute, touchpoint, channel) DO UPDATE SET "
    + ", ".join(f"{name} = b.{name} + EXCLUDED.{name}" for name in (*COUNTS, *SUMS))
    + ", gap_histogram = (SELECT array_agg(x + y ORDER BY i) FROM "
    "unnest(b.gap_histogram, EXCLUDED.gap_histogram) WITH ORDINALITY AS h(x, y, i))"
)

quarters = st.integers(min_value=-400, max_value=400).map(lambda count: count / 4)
bucket_keys = st.tuples(
    st.sampled_from(STAGES),
    st.integers(min_value=0, max_value=SPAN_MINUTES - 1),
    st.sampled_from(TOUCHPOINTS),
    st.sampled_from(CHANNELS),
)
buckets = st.fixed_dictionaries(
    {
        "key": bucket_keys,
        "counts": st.tuples(*(st.integers(min_value=1, max_value=50) for _ in COUNTS)),
        "sums": st.tuples(*(quarters for _ in SUMS)),
        "histogram": st.lists(st.integers(min_value=0, max_value=9), min_size=GAP_HISTOGRAM_BINS,
                              max_size=GAP_HISTOGRAM_BINS),
    }
)  # fmt: skip
minute_spans = st.tuples(
    st.integers(min_value=0, max_value=SPAN_MINUTES), st.integers(min_value=0, max_value=2 * 1440)
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.lists(buckets, min_size=1, max_size=40)),
        st.tuples(st.just("copy"), st.lists(buckets, min_size=1, max_size=20)),
        st.tuples(st.just("update"), minute_spans, quarters),
        st.tuples(st.just("delete"), minute_spans),
    ),
    min_size=1,
    max_size=6,
)
windows = st.tuples(
    st.integers(min_value=-60, max_value=SPAN_MINUTES),  # the start, in minutes from BASE
    st.integers(min_value=0, max_value=3 * 1440),  # minutes from the start to now
    st.sampled_from([1, 7, 60, 90, 360, 1440, 2 * 1440]),  # the series step, in minutes
)


def dsn(postgres) -> str:
    return postgres.url().replace("postgresql+asyncpg://", "postgresql://")


async def apply(conn: asyncpg.Connection, tenant: str, operation: tuple) -> None:
    kind = operation[0]
    if kind in ("upsert", "copy"):
        rows = {}
        for bucket in operation[1]:  # an upsert may not touch a row twice: the last per key counts
            stage, minute, touchpoint, channel = bucket["key"]
            key = (JOURNEY, stage, BASE + timedelta(minutes=minute), touchpoint, channel)
            rows[key] = (*key, *bucket["counts"], *bucket["sums"], bucket["histogram"])
        if kind == "copy":
            existing = {
                tuple(row) for row in await conn.fetch(
                    "SELECT journey, stage, minute, touchpoint, channel FROM stage_buckets WHERE tenant = $1", tenant
                )
            }  # fmt: skip
            records = [(tenant, *row) for key, row in rows.items() if key not in existing]
            await conn.copy_records_to_table("stage_buckets", records=records, columns=["tenant", *COLUMNS])
        else:
            values = list(rows.values())
            columns = [[row[index] for row in values] for index in range(len(COLUMNS))]
            columns[-1] = ["{" + ",".join(map(str, histogram)) + "}" for histogram in columns[-1]]
            await conn.execute(UPSERT, tenant, *columns)
    elif kind == "update":
        (first, length), add = operation[1], operation[2]
        await conn.execute(
            "UPDATE stage_buckets SET events = events + 1, gap_sum = gap_sum + $4, "
            "gap_histogram[3] = gap_histogram[3] + 1 WHERE tenant = $1 AND minute >= $2 AND minute < $3",
            tenant, BASE + timedelta(minutes=first), BASE + timedelta(minutes=first + length), add,
        )  # fmt: skip
    else:
        first, length = operation[1]
        await conn.execute(
            "DELETE FROM stage_buckets WHERE tenant = $1 AND minute >= $2 AND minute < $3",
            tenant, BASE + timedelta(minutes=first), BASE + timedelta(minutes=first + length),
        )  # fmt: skip


def bucket_of(rows: list) -> StageBucket:
    """The reference: a plain sum of minute rows, in Python."""
    total = StageBucket()
    for row in rows:
        for name in (*COUNTS, *SUMS):
            setattr(total, name, getattr(total, name) + row[name])
        total.gap_histogram = [a + b for a, b in zip(total.gap_histogram, row["gap_histogram"], strict=True)]
    return total


def grouped(rows: list, key) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return {group: bucket_of(members) for group, members in groups.items()}


async def check(postgres, ops: list[tuple], in_transaction: bool, reads: list[tuple]) -> None:
    tenant = f"sr-{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn(postgres))
    engine = create_engine(postgres.url(), pool_size=1)
    try:
        transaction = conn.transaction()
        if in_transaction:  # several statements in one transaction: each fires its triggers
            await transaction.start()
        for operation in ops:
            await apply(conn, tenant, operation)
        if in_transaction:
            await transaction.commit()
        minute_rows = [
            dict(row)
            for row in await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM stage_buckets WHERE tenant = $1", tenant)
        ]
        async with engine.connect() as read:
            for start_minute, minutes_to_now, step_minutes in reads:
                start = BASE + timedelta(minutes=start_minute)
                window = Window(start=start, end=start + timedelta(minutes=minutes_to_now, seconds=31))
                step = timedelta(minutes=step_minutes)
                inside = [row for row in minute_rows if row["minute"] >= start]  # no upper bound

                got = await sum_by_stage(read, tenant, JOURNEY, list(STAGES), window)
                assert got == grouped(inside, lambda row: row["stage"])
                stage_rows = [row for row in inside if row["stage"] == STAGES[0]]
                got = await sum_by_touchpoint(read, tenant, JOURNEY, STAGES[0], window)
                assert got == grouped(stage_rows, lambda row: (row["touchpoint"], row["channel"]))
                got = await sum_by_step(read, tenant, JOURNEY, STAGES[0], window, step)
                assert got == grouped(stage_rows, lambda row: start + (row["minute"] - start) // step * step)

                windows_got = await load_stage_windows(read, tenant, [(JOURNEY, stage) for stage in STAGES], window)
                expected = grouped(inside, lambda row: (row["journey"], row["stage"]))
                assert {key: (w.events, w.gap_sum, w.shortfall_events, w.revenue) for key, w in windows_got.items()} == {
                    key: (b.events, b.gap_sum, b.shortfall_events, b.revenue_sum) for key, b in expected.items()
                }
    finally:
        await engine.dispose()
        await conn.execute("DELETE FROM stage_buckets WHERE tenant = $1", tenant)
        await conn.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, in_transaction=st.booleans(), reads=st.lists(windows, min_size=1, max_size=4))
def test_rollup_windows_equal_the_sums_of_minute_buckets(postgres, ops, in_transaction, reads):
    asyncio.run(check(postgres, ops, in_transaction, reads))


async def test_rollups_are_the_minute_buckets_summed_per_hour_and_day(postgres):
    """The tables themselves, after an upsert that inserts and updates and a delete that empties an hour."""
    tenant = f"sr-{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn(postgres))
    histogram = [0] * GAP_HISTOGRAM_BINS

    def bucket(minute: int, events: int) -> dict:
        return {"key": ("s1", minute, "", ""), "counts": (events, 0, 0, 0), "sums": (0.5,) * len(SUMS),
                "histogram": [events, *histogram[1:]]}  # fmt: skip

    try:
        await apply(conn, tenant, ("upsert", [bucket(0, 1), bucket(1, 2), bucket(200, 4)]))
        await apply(conn, tenant, ("upsert", [bucket(1, 8), bucket(2, 16)]))  # one update, one insert
        await apply(conn, tenant, ("delete", (200, 1)))  # the only minute of its hour and day
        hours = await conn.fetch(
            "SELECT hour, events, gap_sum, gap_histogram[1] AS first_bin FROM stage_buckets_hourly "
            "WHERE tenant = $1 ORDER BY hour",
            tenant,
        )
        # BASE is 21:17: minutes 0-2 are in the 21:00 hour; minute 200 (00:37 next day) is gone.
        assert [tuple(row) for row in hours] == [(datetime(2026, 11, 22, 21, tzinfo=timezone.utc), 27, 2.0, 27)]
        days = await conn.fetch("SELECT day, events FROM stage_buckets_daily WHERE tenant = $1", tenant)
        assert [tuple(row) for row in days] == [(datetime(2026, 11, 22, tzinfo=timezone.utc), 27)]
    finally:
        await conn.execute("DELETE FROM stage_buckets WHERE tenant = $1", tenant)
        await conn.close()
