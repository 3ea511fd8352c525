"""The scoring maths (SPEC 5): stage buckets, decayed customer state, quadrants. Pure: no I/O.

Every state here is a sum, or a sum of exponentially decayed terms, so that it does not depend
on the order or batching of events, and two partial states merge into the state of their union.

Decay. An event at time t has weight 2 ** ((t - ref) / half_life) relative to a reference time
ref. A state keeps its sums at ref = the time of its latest event, so every weight is <= 1 and
nothing overflows however long the service runs. Moving a state from ref to a later ref' only
multiplies each of its sums by 2 ** ((ref - ref') / half_life), which is how two states with
different references are merged. A decayed *mean* (sum of weighted values / sum of weights) does
not change with ref at all; a decayed *sum* (revenue) is valued at a time `now` by the same factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

GAP_HISTOGRAM_MIN = -10.0
GAP_HISTOGRAM_BIN_WIDTH = 0.5
GAP_HISTOGRAM_BINS = 40  # -10 .. +10 in 0.5-wide bins
NEGATIVE_EMOTIONS = frozenset({"annoyed", "frustrated", "angry"})
QUADRANTS = ("exemplary", "growth", "at_risk", "disengaged")


@dataclass(frozen=True)
class ScoredEvent:
    """What the maths needs of one accepted event (scores already normalised to 0-10)."""

    event_id: str
    customer_id: str
    journey: str
    stage: str
    touchpoint: str
    channel: str
    occurred_s: float  # seconds since the Unix epoch
    experience: float
    expectation: float
    promise: float
    weight: float
    emotion: str | None = None
    revenue: float = 0.0

    @property
    def gap(self) -> float:
        return self.experience - self.expectation


def decay_factor(from_s: float, to_s: float, half_life_s: float) -> float:
    """The factor that moves a decayed sum kept at time from_s to time to_s."""
    return 2.0 ** ((from_s - to_s) / half_life_s)


def gap_bin(gap: float) -> int:
    index = math.floor((gap - GAP_HISTOGRAM_MIN) / GAP_HISTOGRAM_BIN_WIDTH)
    return min(GAP_HISTOGRAM_BINS - 1, max(0, index))


def minute_of(occurred_s: float) -> float:
    return math.floor(occurred_s / 60.0) * 60.0


# --------------------------------------------------------------------------------------------
# Stage buckets: plain sums per (journey, stage, touchpoint, channel, minute).


@dataclass
class StageBucket:
    events: int = 0
    expectation_sum: float = 0.0
    expectation_sq_sum: float = 0.0
    experience_sum: float = 0.0
    experience_sq_sum: float = 0.0
    gap_sum: float = 0.0
    gap_sq_sum: float = 0.0
    shortfall_events: int = 0  # gap < 0
    promise_kept_events: int = 0  # experience >= promise
    negative_emotion_events: int = 0
    revenue_sum: float = 0.0
    gap_histogram: list[int] = field(default_factory=lambda: [0] * GAP_HISTOGRAM_BINS)

    def add(self, event: ScoredEvent) -> None:
        gap = event.gap
        self.events += 1
        self.expectation_sum += event.expectation
        self.expectation_sq_sum += event.expectation**2
        self.experience_sum += event.experience
        self.experience_sq_sum += event.experience**2
        self.gap_sum += gap
        self.gap_sq_sum += gap**2
        self.shortfall_events += gap < 0
        self.promise_kept_events += event.experience >= event.promise
        self.negative_emotion_events += event.emotion in NEGATIVE_EMOTIONS
        self.revenue_sum += event.revenue
        self.gap_histogram[gap_bin(gap)] += 1

    def merge(self, other: StageBucket) -> StageBucket:
        return StageBucket(
            events=self.events + other.events,
            expectation_sum=self.expectation_sum + other.expectation_sum,
            expectation_sq_sum=self.expectation_sq_sum + other.expectation_sq_sum,
            experience_sum=self.experience_sum + other.experience_sum,
            experience_sq_sum=self.experience_sq_sum + other.experience_sq_sum,
            gap_sum=self.gap_sum + other.gap_sum,
            gap_sq_sum=self.gap_sq_sum + other.gap_sq_sum,
            shortfall_events=self.shortfall_events + other.shortfall_events,
            promise_kept_events=self.promise_kept_events + other.promise_kept_events,
            negative_emotion_events=self.negative_emotion_events + other.negative_emotion_events,
            revenue_sum=self.revenue_sum + other.revenue_sum,
            gap_histogram=[a + b for a, b in zip(self.gap_histogram, other.gap_histogram)],
        )


BucketKey = tuple[str, str, str, str, float]  # journey, stage, touchpoint, channel, minute (epoch s)


def bucket_events(events: list[ScoredEvent]) -> dict[BucketKey, StageBucket]:
    buckets: dict[BucketKey, StageBucket] = {}
    for event in events:
        key = (event.journey, event.stage, event.touchpoint, event.channel, minute_of(event.occurred_s))
        buckets.setdefault(key, StageBucket()).add(event)
    return buckets


def histogram_percentile(histogram: list[int], quantile: float) -> float | None:
    """The quantile of gaps, interpolated linearly inside the 0.5-wide bin that holds it."""
    total = sum(histogram)
    if total == 0:
        return None
    target = quantile * total
    seen = 0
    for index, count in enumerate(histogram):
        # The tolerance absorbs float error in quantile * total (0.14 * 50 = 7.000000000000001).
        if count and seen + count >= target - 1e-9:
            low = GAP_HISTOGRAM_MIN + index * GAP_HISTOGRAM_BIN_WIDTH
            return low + GAP_HISTOGRAM_BIN_WIDTH * (target - seen) / count
        seen += count
    return GAP_HISTOGRAM_MIN + GAP_HISTOGRAM_BINS * GAP_HISTOGRAM_BIN_WIDTH


@dataclass(frozen=True)
class StageStats:
    events: int
    mean_expectation: float | None
    mean_experience: float | None
    mean_gap: float | None
    stddev_gap: float | None
    shortfall_rate: float | None
    promise: float | None
    promise_kept_rate: float | None
    negative_emotion_rate: float | None
    gap_p10: float | None
    gap_p50: float | None
    gap_p90: float | None
    revenue: float

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def stage_stats(bucket: StageBucket, promise: float | None) -> StageStats:
    """The figures of SPEC 6 for one window (the merge of its buckets)."""
    n = bucket.events
    if n == 0:
        return StageStats(0, None, None, None, None, None, promise, None, None, None, None, None, 0.0)
    mean_gap = bucket.gap_sum / n
    # Population standard deviation; clamp the tiny negatives that cancellation can leave.
    variance = max(0.0, bucket.gap_sq_sum / n - mean_gap**2)
    return StageStats(
        events=n,
        mean_expectation=bucket.expectation_sum / n,
        mean_experience=bucket.experience_sum / n,
        mean_gap=mean_gap,
        stddev_gap=math.sqrt(variance),
        shortfall_rate=bucket.shortfall_events / n,
        promise=promise,
        promise_kept_rate=bucket.promise_kept_events / n,
        negative_emotion_rate=bucket.negative_emotion_events / n,
        gap_p10=histogram_percentile(bucket.gap_histogram, 0.10),
        gap_p50=histogram_percentile(bucket.gap_histogram, 0.50),
        gap_p90=histogram_percentile(bucket.gap_histogram, 0.90),
        revenue=bucket.revenue_sum,
    )


# --------------------------------------------------------------------------------------------
# Decayed customer state.


@dataclass(frozen=True)
class HalfLives:
    index_s: float  # customer_half_life: the experience index and the per-stage gap
    trend_s: float  # the short half-life the trend compares against
    revenue_s: float


@dataclass(frozen=True)
class CustomerStageState:
    """Decayed mean gap of one customer at one stage, kept at ref_s = time of the latest event."""

    ref_s: float
    gap_sum: float
    weight_sum: float
    events: int

    @property
    def gap(self) -> float:
        return self.gap_sum / self.weight_sum if self.weight_sum > 0 else 0.0

    @staticmethod
    def of(event: ScoredEvent) -> CustomerStageState:
        return CustomerStageState(ref_s=event.occurred_s, gap_sum=event.gap, weight_sum=1.0, events=1)

    def merge(self, other: CustomerStageState, half_life_s: float) -> CustomerStageState:
        ref_s = max(self.ref_s, other.ref_s)
        mine = decay_factor(self.ref_s, ref_s, half_life_s)
        theirs = decay_factor(other.ref_s, ref_s, half_life_s)
        return CustomerStageState(
            ref_s=ref_s,
            gap_sum=self.gap_sum * mine + other.gap_sum * theirs,
            weight_sum=self.weight_sum * mine + other.weight_sum * theirs,
            events=self.events + other.events,
        )


@dataclass(frozen=True)
class CustomerState:
    """One customer's decayed sums, all kept at ref_s = the time of their latest event.

    The latest journey (for the positioning-map thresholds) is the journey of the event with the
    greatest (occurred_s, event_id): a total order, so late events cannot make it flip-flop.
    """

    ref_s: float
    index_gap_sum: float  # sum of w * stage weight * gap, customer half-life
    index_weight_sum: float  # sum of w * stage weight
    trend_gap_sum: float  # the same with the trend half-life
    trend_weight_sum: float
    revenue_sum: float  # sum of w * revenue, revenue half-life
    events: int
    first_event_s: float
    latest_journey: str
    latest_event_id: str

    @staticmethod
    def of(event: ScoredEvent) -> CustomerState:
        return CustomerState(
            ref_s=event.occurred_s,
            index_gap_sum=event.weight * event.gap,
            index_weight_sum=event.weight,
            trend_gap_sum=event.weight * event.gap,
            trend_weight_sum=event.weight,
            revenue_sum=event.revenue,
            events=1,
            first_event_s=event.occurred_s,
            latest_journey=event.journey,
            latest_event_id=event.event_id,
        )

    def merge(self, other: CustomerState, half_lives: HalfLives) -> CustomerState:
        ref_s = max(self.ref_s, other.ref_s)

        def rebase(state: CustomerState, half_life_s: float) -> float:
            return decay_factor(state.ref_s, ref_s, half_life_s)

        mine_index, theirs_index = rebase(self, half_lives.index_s), rebase(other, half_lives.index_s)
        mine_trend, theirs_trend = rebase(self, half_lives.trend_s), rebase(other, half_lives.trend_s)
        mine_revenue, theirs_revenue = rebase(self, half_lives.revenue_s), rebase(other, half_lives.revenue_s)
        latest = max(self, other, key=lambda state: (state.ref_s, state.latest_event_id))
        return CustomerState(
            ref_s=ref_s,
            index_gap_sum=self.index_gap_sum * mine_index + other.index_gap_sum * theirs_index,
            index_weight_sum=self.index_weight_sum * mine_index + other.index_weight_sum * theirs_index,
            trend_gap_sum=self.trend_gap_sum * mine_trend + other.trend_gap_sum * theirs_trend,
            trend_weight_sum=self.trend_weight_sum * mine_trend + other.trend_weight_sum * theirs_trend,
            revenue_sum=self.revenue_sum * mine_revenue + other.revenue_sum * theirs_revenue,
            events=self.events + other.events,
            first_event_s=min(self.first_event_s, other.first_event_s),
            latest_journey=latest.latest_journey,
            latest_event_id=latest.latest_event_id,
        )

    @property
    def experience_index(self) -> float:
        return self.index_gap_sum / self.index_weight_sum if self.index_weight_sum > 0 else 0.0

    @property
    def trend(self) -> float:
        short = self.trend_gap_sum / self.trend_weight_sum if self.trend_weight_sum > 0 else 0.0
        return short - self.experience_index

    def revenue_at(self, now_s: float, revenue_half_life_s: float) -> float:
        """Decayed revenue valued at now_s (events in the future of now_s count at full value)."""
        return self.revenue_sum * decay_factor(self.ref_s, max(now_s, self.ref_s), revenue_half_life_s)


def revenue_rank(revenue_sum: float, ref_s: float, revenue_half_life_s: float) -> float:
    """log2 of the revenue valued at the epoch: a key that orders customers by their current
    revenue at any query time, since the decay factor to 'now' is the same for everyone."""
    if revenue_sum <= 0:
        return -1e300
    return math.log2(revenue_sum) + ref_s / revenue_half_life_s


def quadrant(
    experience_index: float, revenue: float, experience_threshold: float, revenue_threshold: float
) -> str:
    good = experience_index >= experience_threshold
    high = revenue >= revenue_threshold
    if good:
        return "exemplary" if high else "growth"
    return "at_risk" if high else "disengaged"


def merge_customer_events(
    events: list[ScoredEvent], half_lives: HalfLives
) -> tuple[dict[str, CustomerState], dict[tuple[str, str, str], CustomerStageState]]:
    """Fold a batch of (new, de-duplicated) events into per-customer and per-customer-stage deltas."""
    customers: dict[str, CustomerState] = {}
    stages: dict[tuple[str, str, str], CustomerStageState] = {}
    for event in events:
        state = CustomerState.of(event)
        previous = customers.get(event.customer_id)
        customers[event.customer_id] = state if previous is None else previous.merge(state, half_lives)
        key = (event.customer_id, event.journey, event.stage)
        stage_state = CustomerStageState.of(event)
        previous_stage = stages.get(key)
        stages[key] = stage_state if previous_stage is None else previous_stage.merge(stage_state, half_lives.index_s)
    return customers, stages


def epoch_seconds(moment: datetime) -> float:
    return moment.timestamp()


def from_epoch_seconds(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)

