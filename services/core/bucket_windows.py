"""Which stage-bucket rows to read for a window: minute, hour and day rows that tile it exactly.

Pure. The minute buckets are also summed per UTC hour and day (migration 0006), exactly, the hour
and day in progress included; so a window [start, end) reads minute rows up to the first whole
hour, hour rows up to the first whole day, whole days, then hours and minutes up to the end. A
window without an end (events may be a few minutes ahead of now) reads day rows to the end.

Every value in a bucket is a count or a sum, so rows can also be subtracted: an open window that
starts a few minutes into an hour reads that hour's row less those minutes, instead of the rest
of the hour in minute rows. Its first hour then costs at most 30 minutes of minute rows, not up
to 59 (`window_ranges(..., now=...)`).
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
    """The rows of one granularity whose start is in [start, end); end None: no upper bound.
    sign -1: rows to subtract from the sums, not add."""

    granularity: timedelta
    start: datetime
    end: datetime | None
    sign: int = 1


@dataclass(frozen=True)
class Window:
    """The buckets whose minute is >= start; no upper bound, as events may be up to 5 min ahead.
    The API's windows, the stage alerts' and the gauges'."""

    start: datetime
    end: datetime  # query time, reported as `to`

    @staticmethod
    def ending_at(now: datetime, length: timedelta) -> Window:
        start = (now - length).replace(second=0, microsecond=0)  # date_trunc('minute', now - window)
        return Window(start=start, end=now)

    def ranges(self) -> list[BucketRange]:
        """The rows to read: the window is open (no upper bound), and no rows lie much past `end`."""
        return window_ranges(self.start, now=self.end)


def floor_to(moment: datetime, granularity: timedelta) -> datetime:
    return _EPOCH + (moment - _EPOCH) // granularity * granularity


def ceil_to(moment: datetime, granularity: timedelta) -> datetime:
    return _EPOCH - (_EPOCH - moment) // granularity * granularity


def window_ranges(start: datetime, end: datetime | None = None, *, now: datetime | None = None) -> list[BucketRange]:
    """The fewest rows covering exactly the minutes of [start, end), coarsest where they fit.

    With `now` (an open window only: no rows lie much past now), the minutes of the window's first,
    partial hour may instead be read as that hour's row less the minute rows before `start`,
    whichever is fewer minutes; the ranges then hold one with sign -1."""
    if start != floor_to(start, MINUTE) or (end is not None and end != floor_to(end, MINUTE)):
        raise ValueError(f"window bounds must be whole minutes: {start}, {end}")
    if now is not None and end is not None:
        raise ValueError("now is for open windows: a closed window's rows lie within its bounds")
    ranges = list(_tile(start, end, len(GRANULARITIES) - 1))
    head_hour = floor_to(start, HOUR)
    minutes_before = start - head_hour
    minutes_after = min(head_hour + HOUR, max(now, start)) - start if now is not None else timedelta(0)
    if MINUTE <= minutes_before < minutes_after:
        # The first range is [start, head_hour + HOUR) in minutes (the window is open, so it
        # reaches past the head hour): read the hour's row less the minutes before start.
        assert ranges[0] == BucketRange(MINUTE, start, head_hour + HOUR), ranges
        ranges[0:1] = [BucketRange(MINUTE, head_hour, start, sign=-1), BucketRange(HOUR, head_hour, head_hour + HOUR)]
    return _merged(ranges)


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
        if (
            previous
            and (previous.granularity, previous.sign) == (bucket_range.granularity, bucket_range.sign)
            and previous.end == bucket_range.start
        ):
            merged[-1] = BucketRange(previous.granularity, previous.start, bucket_range.end, previous.sign)
        else:
            merged.append(bucket_range)
    return merged
