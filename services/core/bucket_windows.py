"""Which stage-bucket rows to read for a window: minute, hour and day rows that tile it exactly.

Pure. The minute buckets are also summed per UTC hour and day (migration 0006), exactly, the hour
and day in progress included; so a window [start, end) reads minute rows up to the first whole
hour, hour rows up to the first whole day, whole days, then hours and minutes up to the end. A
window without an end (events may be a few minutes ahead of now) reads day rows to the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
GRANULARITIES = (MINUTE, HOUR, DAY)  # finest first; each divides the next
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # hours and days are UTC ones


@dataclass(frozen=True)
class BucketRange:
    """The rows of one granularity whose start is in [start, end); end None: no upper bound."""

    granularity: timedelta
    start: datetime
    end: datetime | None


def floor_to(moment: datetime, granularity: timedelta) -> datetime:
    return _EPOCH + (moment - _EPOCH) // granularity * granularity


def ceil_to(moment: datetime, granularity: timedelta) -> datetime:
    return _EPOCH - (_EPOCH - moment) // granularity * granularity


def window_ranges(start: datetime, end: datetime | None = None) -> list[BucketRange]:
    """The fewest rows covering exactly the minutes of [start, end), coarsest where they fit."""
    if start != floor_to(start, MINUTE) or (end is not None and end != floor_to(end, MINUTE)):
        raise ValueError(f"window bounds must be whole minutes: {start}, {end}")
    return _merged(_tile(start, end, len(GRANULARITIES) - 1))


def _tile(start: datetime, end: datetime | None, coarsest: int) -> Iterator[BucketRange]:
    if end is not None and start >= end:
        return
    for level in range(coarsest, 0, -1):
        granularity = GRANULARITIES[level]
        low = ceil_to(start, granularity)
        high = None if end is None else floor_to(end, granularity)
        if high is None or low < high:
            # What is left on either side is shorter than this granularity: finer ones tile it.
            yield from _tile(start, low, level - 1)
            yield BucketRange(granularity, low, high)
            if high is not None:
                yield from _tile(high, end, level - 1)
            return
    yield BucketRange(MINUTE, start, end)


def series_ranges(start: datetime, step: timedelta, last: datetime) -> list[BucketRange]:
    """The rows of a series whose steps start at `start`, every `step`, up to the one holding
    `last`, then everything after in minute rows (a few minutes of events ahead of now).

    Each step is tiled on its own, so no row straddles two steps: a row's start says its step
    (date_bin(step, row start, start)), whatever the alignment of the steps to hours and days."""
    if step <= timedelta(0) or step % MINUTE:
        raise ValueError(f"a step is a positive number of whole minutes: {step}")
    ranges: list[BucketRange] = []
    step_start = start
    while step_start <= last:
        step_end = step_start + step
        tiles = window_ranges(step_start, step_end)
        minutes = sum((tile.end - tile.start for tile in tiles if tile.granularity == MINUTE), timedelta(0))
        # Coarser rows split the minutes of a step in two ranges: worth it when they replace most
        # of them (a 1d step from 10:32: 23 hours), not for a 2h step from 10:32 (one hour).
        ranges += tiles if minutes <= step / 4 else [BucketRange(MINUTE, step_start, step_end)]
        step_start = step_end
    ranges.append(BucketRange(MINUTE, step_start, None))
    return _merged(ranges)


def _merged(ranges: list[BucketRange] | Iterator[BucketRange]) -> list[BucketRange]:
    """Adjacent ranges of one granularity as one (the steps of a series meet end to start)."""
    merged: list[BucketRange] = []
    for bucket_range in ranges:
        previous = merged[-1] if merged else None
        if previous and previous.granularity == bucket_range.granularity and previous.end == bucket_range.start:
            merged[-1] = BucketRange(previous.granularity, previous.start, bucket_range.end)
        else:
            merged.append(bucket_range)
    return merged
