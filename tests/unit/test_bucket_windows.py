"""The tiling of windows and series into minute, hour and day rows (services/core/bucket_windows.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.bucket_windows import (
    DAY,
    HOUR,
    MINUTE,
    BucketRange,
    ceil_to,
    floor_to,
    series_ranges,
    window_ranges,
)

BASE = datetime(2026, 11, 24, tzinfo=timezone.utc)
minutes = st.integers(min_value=-3 * 1440, max_value=3 * 1440).map(lambda count: BASE + count * MINUTE)
steps = st.sampled_from([1, 7, 59, 60, 61, 90, 120, 360, 1439, 1440, 1441, 2880]).map(lambda count: count * MINUTE)


def rows(ranges: list[BucketRange], horizon: datetime) -> list[tuple[datetime, timedelta]]:
    """Every row (start, granularity) the ranges read, those of open ranges up to `horizon`."""
    found = []
    for bucket_range in ranges:
        start = bucket_range.start
        while start < (bucket_range.end or horizon):
            found.append((start, bucket_range.granularity))
            start += bucket_range.granularity
    return found


def minutes_of(found: list[tuple[datetime, timedelta]], horizon: datetime) -> list[datetime]:
    return sorted(
        row_start + offset * MINUTE
        for row_start, granularity in found
        for offset in range(granularity // MINUTE)
        if row_start + offset * MINUTE < horizon
    )


def every_minute(start: datetime, end: datetime) -> list[datetime]:
    return [start + offset * MINUTE for offset in range((end - start) // MINUTE)]


@given(start=minutes, length=st.integers(min_value=0, max_value=5 * 1440))
def test_a_window_reads_each_of_its_minutes_once_in_aligned_rows(start, length):
    end = start + length * MINUTE
    ranges = window_ranges(start, end)
    found = rows(ranges, end)
    assert all(floor_to(row_start, granularity) == row_start for row_start, granularity in found)
    assert minutes_of(found, end + DAY) == every_minute(start, end)  # nothing past the end either
    # At most 59 minutes and 23 hours on each side: the coarsest rows that fit.
    assert sum(granularity == MINUTE for _, granularity in found) <= 2 * 59
    assert sum(granularity == HOUR for _, granularity in found) <= 2 * 23


@given(start=minutes)
def test_an_open_window_reads_every_minute_from_its_start(start):
    ranges = window_ranges(start)
    assert ranges[-1] == BucketRange(DAY, ceil_to(start, DAY), None)
    horizon = start + 10 * DAY
    assert minutes_of(rows(ranges, horizon), horizon) == every_minute(start, horizon)


@given(start=minutes, minutes_to_now=st.integers(min_value=0, max_value=2 * 1440))
def test_an_open_window_up_to_now_counts_every_minute_from_its_start_once(start, minutes_to_now):
    now = start + minutes_to_now * MINUTE + timedelta(seconds=31)
    ranges = window_ranges(start, now=now)
    horizon = ceil_to(now, DAY) + DAY
    counted: dict[datetime, int] = {}
    for bucket_range in ranges:
        for minute in minutes_of(rows([bucket_range], horizon), horizon):
            counted[minute] = counted.get(minute, 0) + bucket_range.sign
    assert sorted(minute for minute, times in counted.items() if times) == every_minute(start, horizon)
    assert set(counted.values()) <= {0, 1}  # a minute subtracted was added once, by its hour's row
    # The first hour's minutes: read or subtracted, whichever are fewer up to now.
    head_hour = floor_to(start, HOUR)
    before, after = (start - head_hour) // MINUTE, min(60 - (start - head_hour) // MINUTE, minutes_to_now + 1)
    minute_rows = sum(granularity == MINUTE for _, granularity in rows(ranges, head_hour + HOUR))
    assert minute_rows == (before if 0 < before < after else 60 - before if before else 0)
    assert sum(item.sign < 0 for item in ranges) <= 1


def test_a_30_day_window_early_in_the_hour_reads_the_hour_less_its_first_minutes():
    start = datetime(2026, 10, 25, 10, 7, tzinfo=timezone.utc)
    hour = datetime(2026, 10, 25, 10, tzinfo=timezone.utc)
    assert window_ranges(start, now=start + 30 * DAY) == [
        BucketRange(MINUTE, hour, start, sign=-1),
        BucketRange(HOUR, hour, datetime(2026, 10, 26, tzinfo=timezone.utc)),
        BucketRange(DAY, datetime(2026, 10, 26, tzinfo=timezone.utc), None),
    ]
    # Late in the hour, or without now: the minutes from the start.
    assert window_ranges(start.replace(minute=32), now=start + 30 * DAY)[0] == BucketRange(
        MINUTE, start.replace(minute=32), start.replace(hour=11, minute=0)
    )
    assert window_ranges(start)[0] == BucketRange(MINUTE, start, start.replace(hour=11, minute=0))


def test_a_window_started_minutes_ago_reads_its_own_minutes():
    start = datetime(2026, 11, 24, 13, 27, tzinfo=timezone.utc)
    assert window_ranges(start, now=start + 5 * MINUTE)[0] == BucketRange(MINUTE, start, start.replace(hour=14, minute=0))
    with pytest.raises(ValueError):
        window_ranges(start, start + HOUR, now=start)


@given(start=minutes, step=steps, steps_to_now=st.integers(min_value=0, max_value=40))
def test_no_series_row_straddles_two_steps(start, step, steps_to_now):
    last = start + steps_to_now * step + MINUTE * (steps_to_now % 3)
    ranges = series_ranges(start, step, last)
    horizon = last + 2 * step + DAY
    found = rows(ranges, horizon)
    assert minutes_of(found, horizon) == every_minute(start, horizon)
    for row_start, granularity in found:
        first, final = row_start, row_start + granularity - MINUTE
        assert (first - start) // step == (final - start) // step, (row_start, granularity)
    # After the step holding `last`, minute rows only: any later row is in one step too.
    assert ranges[-1].granularity == MINUTE and ranges[-1].end is None


def test_a_30_day_window_reads_minutes_then_hours_then_days():
    start = datetime(2026, 10, 25, 10, 32, tzinfo=timezone.utc)
    assert window_ranges(start) == [
        BucketRange(MINUTE, start, datetime(2026, 10, 25, 11, tzinfo=timezone.utc)),
        BucketRange(HOUR, datetime(2026, 10, 25, 11, tzinfo=timezone.utc), datetime(2026, 10, 26, tzinfo=timezone.utc)),
        BucketRange(DAY, datetime(2026, 10, 26, tzinfo=timezone.utc), None),
    ]


def test_daily_steps_at_a_minute_origin_read_whole_hours_between_the_minutes():
    start = datetime(2026, 11, 1, 10, 32, tzinfo=timezone.utc)
    ranges = series_ranges(start, DAY, start + 2 * DAY)
    assert ranges[:3] == [
        BucketRange(MINUTE, start, datetime(2026, 11, 1, 11, tzinfo=timezone.utc)),
        BucketRange(HOUR, datetime(2026, 11, 1, 11, tzinfo=timezone.utc), datetime(2026, 11, 2, 10, tzinfo=timezone.utc)),
        # The end of the first step and the start of the second meet: one range.
        BucketRange(MINUTE, datetime(2026, 11, 2, 10, tzinfo=timezone.utc), datetime(2026, 11, 2, 11, tzinfo=timezone.utc)),
    ]


def test_steps_mostly_in_minutes_read_minutes_only():
    start = datetime(2026, 11, 1, 10, 32, tzinfo=timezone.utc)
    assert series_ranges(start, 2 * HOUR, start + DAY) == [BucketRange(MINUTE, start, None)]
    aligned = datetime(2026, 11, 1, 10, tzinfo=timezone.utc)
    assert series_ranges(aligned, 2 * HOUR, aligned + 4 * HOUR)[0] == BucketRange(HOUR, aligned, aligned + 6 * HOUR)


def test_bounds_must_be_whole_minutes():
    with pytest.raises(ValueError):
        window_ranges(BASE + timedelta(seconds=30))
    with pytest.raises(ValueError):
        series_ranges(BASE, timedelta(seconds=90), BASE)
