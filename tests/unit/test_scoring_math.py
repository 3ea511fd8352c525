"""Property tests of the pure scoring maths (SPEC 5) against a naive reference computation.

The reference below is written straight from SPEC 5, deliberately without any of the tricks of
services/core/scoring.py (no incremental merging, no rebasing between states): for one customer,
every event gets the weight 2 ** ((occurred - ref) / half_life) with one fixed ref = the time of
the customer's latest event, and the figures are plain sums of plain lists. The code under test
must agree with it whatever the order, batching and redelivery of the events.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from fractions import Fraction
from itertools import product

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from services.core.scoring import (
    GAP_HISTOGRAM_BIN_WIDTH,
    GAP_HISTOGRAM_BINS,
    GAP_HISTOGRAM_MIN,
    CustomerStageState,
    CustomerState,
    HalfLives,
    ScoredEvent,
    StageBucket,
    bucket_events,
    gap_bin,
    histogram_percentile,
    merge_customer_events,
    minute_of,
    quadrant,
    revenue_rank,
    stage_stats,
)

DAY = 86_400.0
BASE_S = 1.8e9
SPAN_S = 60 * DAY
DEFAULT_HALF_LIVES = HalfLives(index_s=30 * DAY, trend_s=7 * DAY, revenue_s=90 * DAY)
NEGATIVE = {"annoyed", "frustrated", "angry"}

CUSTOMERS = ("c-1", "c-2", "c-3")
JOURNEYS = ("car-rental", "hotel")
STAGES = ("search", "book", "pick-up")
TOUCHPOINTS = ("website", "desk")
CHANNELS = ("web", "app", "phone")
EMOTIONS = (None, "happy", "neutral", "delighted", "annoyed", "frustrated", "angry")

REL = 1e-9
ABS = 1e-9
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# The tests that generate whole event streams (up to 60 events of 9 fields, then shuffle, batch and
# merge them) run fewer examples, so that the file stays well under 15 s.
STREAM_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=80)


def close(a: float, b: float, rel: float = REL, abs_: float = ABS) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# --------------------------------------------------------------------------------------------
# Generators.

# Scores on the 0-10 scale: arbitrary floats, plus the 0.5 grid so that gaps hit bin edges, 0, +-10.
scores = st.one_of(st.floats(0.0, 10.0), st.integers(0, 20).map(lambda k: k / 2))
stage_weights = st.floats(0.1, 3.0, exclude_min=True)
revenues = st.one_of(st.just(0.0), st.floats(0.0, 1e6))
# Within a 60-day span around 1.8e9: arbitrary instants, whole seconds, and a few shared instants
# (same-minute buckets and exact ties of occurred_s, which the latest journey must break by id).
occurred_times = st.one_of(
    st.floats(BASE_S - SPAN_S / 2, BASE_S + SPAN_S / 2),
    st.integers(int(-SPAN_S / 2), int(SPAN_S / 2)).map(lambda s: BASE_S + s),
    st.sampled_from([BASE_S, BASE_S + 30.0, BASE_S + 60.0, BASE_S - 3 * DAY]),
)
half_lives_choices = st.sampled_from(
    [DEFAULT_HALF_LIVES, HalfLives(index_s=1 * DAY, trend_s=3_600.0, revenue_s=10 * DAY)]
)


WHERE = st.sampled_from(list(product(CUSTOMERS, JOURNEYS, STAGES, TOUCHPOINTS, CHANNELS)))


@st.composite
def event_lists(draw, min_size: int = 1, max_size: int = 60, times=occurred_times) -> list[ScoredEvent]:
    """1-60 events with unique string ids; a stage's weight is fixed within one example."""
    weight_of = {(j, s): draw(stage_weights) for j in JOURNEYS for s in STAGES}
    ids = draw(st.lists(st.uuids().map(str), min_size=min_size, max_size=max_size, unique=True))
    events = []
    for event_id in ids:
        customer, journey, stage, touchpoint, channel = draw(WHERE)
        events.append(
            ScoredEvent(
                event_id=event_id,
                customer_id=customer,
                journey=journey,
                stage=stage,
                touchpoint=touchpoint,
                channel=channel,
                occurred_s=draw(times),
                experience=draw(scores),
                expectation=draw(scores),
                promise=draw(scores),
                weight=weight_of[(journey, stage)],
                emotion=draw(st.sampled_from(EMOTIONS)),
                revenue=draw(revenues),
            )
        )
    return events


def draw_batches(data, events: list) -> list[list]:
    """Split the events at arbitrary points into consecutive batches (some may be empty)."""
    cuts = data.draw(st.lists(st.integers(0, len(events)), max_size=8), label="cuts")
    bounds = [0, *sorted(cuts), len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:])]


# --------------------------------------------------------------------------------------------
# The code under test, used the way the consumer uses it.


def fold(events: list[ScoredEvent], half_lives: HalfLives):
    customers, stages = merge_customer_events(events, half_lives)
    return bucket_events(events), customers, stages


def merge_two(left, right, half_lives: HalfLives):
    buckets, customers, stages = dict(left[0]), dict(left[1]), dict(left[2])
    for key, bucket in right[0].items():
        buckets[key] = buckets[key].merge(bucket) if key in buckets else bucket
    for key, state in right[1].items():
        customers[key] = customers[key].merge(state, half_lives) if key in customers else state
    for key, state in right[2].items():
        stages[key] = stages[key].merge(state, half_lives.index_s) if key in stages else state
    return buckets, customers, stages


def merge_in_random_tree(data, partials: list, half_lives: HalfLives):
    """Merge partial states pairwise, picking both operands (and their orientation) at random."""
    parts = list(partials)
    if not parts:
        return {}, {}, {}
    while len(parts) > 1:
        i = data.draw(st.integers(0, len(parts) - 1), label="left")
        j = data.draw(st.integers(0, len(parts) - 2), label="right")
        left = parts.pop(i)
        right = parts.pop(j)
        parts.append(merge_two(left, right, half_lives))
    return parts[0]


def dedupe(events: list[ScoredEvent], seen: set[str]) -> list[ScoredEvent]:
    """The consumer's rule: drop an event whose event_id was already seen; first seen wins."""
    fresh = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            fresh.append(event)
    return fresh


# --------------------------------------------------------------------------------------------
# The naive reference, straight from SPEC 5.


def naive_buckets(events: list[ScoredEvent]) -> dict:
    groups: dict = defaultdict(list)
    for e in events:
        groups[(e.journey, e.stage, e.touchpoint, e.channel, math.floor(e.occurred_s / 60) * 60.0)].append(e)
    out = {}
    for key, evs in groups.items():
        gaps = [e.experience - e.expectation for e in evs]
        histogram = [0] * 40
        for g in gaps:
            histogram[min(39, int((g + 10) // 0.5))] += 1
        out[key] = dict(
            events=len(evs),
            expectation_sum=math.fsum(e.expectation for e in evs),
            expectation_sq_sum=math.fsum(e.expectation**2 for e in evs),
            experience_sum=math.fsum(e.experience for e in evs),
            experience_sq_sum=math.fsum(e.experience**2 for e in evs),
            gap_sum=math.fsum(gaps),
            gap_sq_sum=math.fsum(g * g for g in gaps),
            shortfall_events=sum(1 for g in gaps if g < 0),
            promise_kept_events=sum(1 for e in evs if e.experience >= e.promise),
            negative_emotion_events=sum(1 for e in evs if e.emotion in NEGATIVE),
            revenue_sum=math.fsum(e.revenue for e in evs),
            gap_histogram=histogram,
        )
    return out


def naive_weighted_mean(evs: list[ScoredEvent], ref: float, half_life: float, stage_weighted: bool) -> float:
    ws = [2 ** ((e.occurred_s - ref) / half_life) * (e.weight if stage_weighted else 1.0) for e in evs]
    return math.fsum(w * (e.experience - e.expectation) for w, e in zip(ws, evs)) / math.fsum(ws)


def naive_customers(events: list[ScoredEvent], hl: HalfLives) -> dict[str, dict]:
    by_customer: dict = defaultdict(list)
    for e in events:
        by_customer[e.customer_id].append(e)
    out = {}
    for customer, evs in by_customer.items():
        ref = max(e.occurred_s for e in evs)
        latest = max(evs, key=lambda e: (e.occurred_s, e.event_id))

        def w(e, half_life):
            return 2 ** ((e.occurred_s - ref) / half_life)

        index = naive_weighted_mean(evs, ref, hl.index_s, stage_weighted=True)
        out[customer] = dict(
            ref_s=ref,
            index_gap_sum=math.fsum(w(e, hl.index_s) * e.weight * e.gap for e in evs),
            index_weight_sum=math.fsum(w(e, hl.index_s) * e.weight for e in evs),
            trend_gap_sum=math.fsum(w(e, hl.trend_s) * e.weight * e.gap for e in evs),
            trend_weight_sum=math.fsum(w(e, hl.trend_s) * e.weight for e in evs),
            revenue_sum=math.fsum(w(e, hl.revenue_s) * e.revenue for e in evs),
            events=len(evs),
            first_event_s=min(e.occurred_s for e in evs),
            latest_journey=latest.journey,
            latest_event_id=latest.event_id,
            experience_index=index,
            trend=naive_weighted_mean(evs, ref, hl.trend_s, stage_weighted=True) - index,
        )
    return out


def naive_revenue_at(evs: list[ScoredEvent], now_s: float, revenue_half_life_s: float) -> float:
    return math.fsum(e.revenue * 2 ** ((e.occurred_s - now_s) / revenue_half_life_s) for e in evs)


def naive_customer_stages(events: list[ScoredEvent], hl: HalfLives) -> dict:
    groups: dict = defaultdict(list)
    for e in events:
        groups[(e.customer_id, e.journey, e.stage)].append(e)
    out = {}
    for key, evs in groups.items():
        ref = max(e.occurred_s for e in evs)
        ws = [2 ** ((e.occurred_s - ref) / hl.index_s) for e in evs]
        out[key] = dict(
            ref_s=ref,
            gap_sum=math.fsum(w * e.gap for w, e in zip(ws, evs)),
            weight_sum=math.fsum(ws),
            events=len(evs),
            gap=naive_weighted_mean(evs, ref, hl.index_s, stage_weighted=False),
        )
    return out


def nearest_rank(values: list[float], quantile: Fraction) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(quantile * len(ordered))) - 1]


def naive_stage_figures(evs: list[ScoredEvent]) -> dict:
    gaps = [e.experience - e.expectation for e in evs]
    n = len(evs)
    return dict(
        events=n,
        mean_expectation=statistics.fmean(e.expectation for e in evs),
        mean_experience=statistics.fmean(e.experience for e in evs),
        mean_gap=statistics.fmean(gaps),
        variance_gap=statistics.pvariance(gaps),
        shortfall_rate=sum(1 for g in gaps if g < 0) / n,
        promise_kept_rate=sum(1 for e in evs if e.experience >= e.promise) / n,
        negative_emotion_rate=sum(1 for e in evs if e.emotion in NEGATIVE) / n,
        revenue=math.fsum(e.revenue for e in evs),
        gap_p10=nearest_rank(gaps, Fraction(1, 10)),
        gap_p50=nearest_rank(gaps, Fraction(1, 2)),
        gap_p90=nearest_rank(gaps, Fraction(9, 10)),
        gap_min=min(gaps),
        gap_max=max(gaps),
    )


# --------------------------------------------------------------------------------------------
# Comparisons.

BUCKET_COUNTS = ("events", "shortfall_events", "promise_kept_events", "negative_emotion_events")
BUCKET_SUMS = (
    "expectation_sum", "expectation_sq_sum", "experience_sum", "experience_sq_sum",
    "gap_sum", "gap_sq_sum", "revenue_sum",
)  # fmt: skip
CUSTOMER_SUMS = ("index_gap_sum", "index_weight_sum", "trend_gap_sum", "trend_weight_sum", "revenue_sum")


def assert_buckets_match(actual: dict[tuple, StageBucket], expected: dict[tuple, dict]) -> None:
    assert set(actual) == set(expected)
    for key, bucket in actual.items():
        want = expected[key]
        for name in BUCKET_COUNTS:
            assert getattr(bucket, name) == want[name], (key, name)
        for name in BUCKET_SUMS:
            assert close(getattr(bucket, name), want[name]), (key, name, getattr(bucket, name), want[name])
        assert bucket.gap_histogram == want["gap_histogram"], key


def assert_customers_match(actual: dict[str, CustomerState], expected: dict[str, dict]) -> None:
    assert set(actual) == set(expected)
    for customer, state in actual.items():
        want = expected[customer]
        assert state.ref_s == want["ref_s"]
        assert state.events == want["events"]
        assert state.first_event_s == want["first_event_s"]
        assert (state.latest_journey, state.latest_event_id) == (want["latest_journey"], want["latest_event_id"])
        for name in CUSTOMER_SUMS:
            assert close(getattr(state, name), want[name]), (customer, name, getattr(state, name), want[name])
        assert close(state.experience_index, want["experience_index"])
        assert close(state.trend, want["trend"])


def assert_customer_stages_match(actual: dict[tuple, CustomerStageState], expected: dict[tuple, dict]) -> None:
    assert set(actual) == set(expected)
    for key, state in actual.items():
        want = expected[key]
        assert state.ref_s == want["ref_s"]
        assert state.events == want["events"]
        assert close(state.gap_sum, want["gap_sum"]), key
        assert close(state.weight_sum, want["weight_sum"]), key
        assert close(state.gap, want["gap"]), key


def assert_matches_naive(folded, events: list[ScoredEvent], half_lives: HalfLives) -> None:
    buckets, customers, stages = folded
    assert_buckets_match(buckets, naive_buckets(events))
    assert_customers_match(customers, naive_customers(events, half_lives))
    assert_customer_stages_match(stages, naive_customer_stages(events, half_lives))


def assert_same_state(a, b) -> None:
    """Two folds agree: counts and histograms exactly, floats to rounding."""
    as_naive_buckets = {
        key: {name: getattr(bucket, name) for name in (*BUCKET_COUNTS, *BUCKET_SUMS, "gap_histogram")}
        for key, bucket in b[0].items()
    }
    assert_buckets_match(a[0], as_naive_buckets)
    assert_customers_match(
        a[1],
        {
            key: {
                **{name: getattr(s, name) for name in ("ref_s", "events", "first_event_s", *CUSTOMER_SUMS)},
                "latest_journey": s.latest_journey,
                "latest_event_id": s.latest_event_id,
                "experience_index": s.experience_index,
                "trend": s.trend,
            }
            for key, s in b[1].items()
        },
    )
    assert_customer_stages_match(
        a[2],
        {
            key: {"ref_s": s.ref_s, "gap_sum": s.gap_sum, "weight_sum": s.weight_sum, "events": s.events, "gap": s.gap}
            for key, s in b[2].items()
        },
    )


def window_of(buckets: dict[tuple, StageBucket], journey: str, stage: str) -> StageBucket:
    window = StageBucket()
    for key, bucket in buckets.items():
        if key[:2] == (journey, stage):
            window = window.merge(bucket)
    return window


def assert_stage_stats_match(buckets: dict[tuple, StageBucket], events: list[ScoredEvent]) -> None:
    for journey, stage in product(JOURNEYS, STAGES):
        evs = [e for e in events if (e.journey, e.stage) == (journey, stage)]
        stats = stage_stats(window_of(buckets, journey, stage), promise=7.5)
        assert stats.promise == 7.5
        if not evs:
            assert stats.events == 0 and stats.mean_gap is None and stats.gap_p50 is None
            assert stats.revenue == 0.0
            continue
        want = naive_stage_figures(evs)
        assert stats.events == want["events"]
        for name in ("mean_expectation", "mean_experience", "mean_gap", "revenue"):
            assert close(getattr(stats, name), want[name]), name
        # The stddev comes from sums of squares (SPEC 5), so compare variances: when all gaps are
        # equal the true stddev is 0 and the square root magnifies a rounding residue of ~1e-16.
        assert close(stats.stddev_gap**2, want["variance_gap"], abs_=1e-9)
        assert stats.shortfall_rate == want["shortfall_rate"]
        assert stats.promise_kept_rate == want["promise_kept_rate"]
        assert stats.negative_emotion_rate == want["negative_emotion_rate"]
        for name in ("gap_p10", "gap_p50", "gap_p90"):
            assert abs(getattr(stats, name) - want[name]) <= GAP_HISTOGRAM_BIN_WIDTH + 1e-9, name
        assert stats.gap_p10 <= stats.gap_p50 <= stats.gap_p90


# --------------------------------------------------------------------------------------------
# 1. Order independence.


@STREAM_SETTINGS
@given(events=event_lists(), half_lives=half_lives_choices, data=st.data())
def test_event_order_does_not_change_buckets_or_customer_scores(events, half_lives, data):
    shuffled = data.draw(st.permutations(events), label="shuffled")

    in_order = fold(events, half_lives)
    reordered = fold(shuffled, half_lives)

    assert_same_state(reordered, in_order)
    assert_matches_naive(reordered, events, half_lives)
    assert_stage_stats_match(reordered[0], events)


# --------------------------------------------------------------------------------------------
# 2. Merging partial states = folding everything at once = the naive reference.


@STREAM_SETTINGS
@given(events=event_lists(), half_lives=half_lives_choices, data=st.data())
def test_batching_and_merge_order_do_not_change_customer_scores(events, half_lives, data):
    shuffled = data.draw(st.permutations(events), label="shuffled")
    partials = [fold(batch, half_lives) for batch in draw_batches(data, shuffled)]

    merged = merge_in_random_tree(data, partials, half_lives)

    assert_same_state(merged, fold(events, half_lives))
    assert_matches_naive(merged, events, half_lives)
    assert_stage_stats_match(merged[0], events)


@STREAM_SETTINGS
@given(events=event_lists(min_size=2, max_size=12), data=st.data())
def test_merging_customer_states_is_commutative_and_associative(events, data):
    hl = DEFAULT_HALF_LIVES
    customer = data.draw(st.sampled_from(sorted({e.customer_id for e in events})), label="customer")
    evs = [e for e in events if e.customer_id == customer]
    states = [CustomerState.of(e) for e in evs]
    a, b, c = (data.draw(st.sampled_from(states), label=name) for name in "abc")

    ab, ba = a.merge(b, hl), b.merge(a, hl)
    left, right = a.merge(b, hl).merge(c, hl), a.merge(b.merge(c, hl), hl)
    for x, y in ((ab, ba), (left, right)):
        assert (x.ref_s, x.events, x.first_event_s, x.latest_journey, x.latest_event_id) == (
            y.ref_s, y.events, y.first_event_s, y.latest_journey, y.latest_event_id,
        )  # fmt: skip
        for name in CUSTOMER_SUMS:
            assert close(getattr(x, name), getattr(y, name)), name


# --------------------------------------------------------------------------------------------
# 3. Redelivery: de-duplicating by event_id makes repeated deliveries have no effect.


@st.composite
def deliveries(draw):
    """The unique events, and a delivery stream in which some are delivered again (redelivery,
    client retries), possibly with a different payload under the same event_id."""
    events = draw(event_lists())
    stream = list(events)
    for original in draw(st.lists(st.sampled_from(events), max_size=40)):
        if draw(st.booleans()):
            copy = original  # an exact redelivery
        else:  # a retry that reuses the id with other values: must be dropped too if it comes later
            copy = ScoredEvent(
                **{
                    **original.__dict__,
                    "experience": draw(scores),
                    "revenue": draw(revenues),
                    "occurred_s": draw(occurred_times),
                    "journey": draw(st.sampled_from(JOURNEYS)),
                }
            )
        stream.append(copy)
    return events, draw(st.permutations(stream))


@STREAM_SETTINGS
@given(delivered=deliveries(), data=st.data())
def test_redelivered_events_have_no_effect_once_deduplicated_by_event_id(delivered, data):
    hl = DEFAULT_HALF_LIVES
    events, stream = delivered
    first_seen = dedupe(stream, set())  # what "first seen wins" keeps, as one list
    assert sorted(e.event_id for e in first_seen) == sorted(e.event_id for e in events)

    # The consumer: per batch, drop ids seen in this or any earlier batch, fold, merge.
    seen: set[str] = set()
    partials = [fold(dedupe(batch, seen), hl) for batch in draw_batches(data, stream)]
    merged = merge_in_random_tree(data, partials, hl)

    assert_same_state(merged, fold(first_seen, hl))
    assert_matches_naive(merged, first_seen, hl)
    exact_redeliveries_only = {e.event_id: e for e in first_seen} == {e.event_id: e for e in events}
    if exact_redeliveries_only:
        assert_matches_naive(merged, events, hl)


@STREAM_SETTINGS
@given(events=event_lists(max_size=20), copies=st.integers(1, 4), data=st.data())
def test_delivering_every_event_several_times_counts_each_once(events, copies, data):
    hl = DEFAULT_HALF_LIVES
    stream = data.draw(st.permutations(events * (copies + 1)), label="stream")
    seen: set[str] = set()
    partials = [fold(dedupe(batch, seen), hl) for batch in draw_batches(data, stream)]
    merged = merge_in_random_tree(data, partials, hl)

    assert sum(b.events for b in merged[0].values()) == len(events)
    assert sum(s.events for s in merged[1].values()) == len(events)
    assert_matches_naive(merged, events, hl)


# --------------------------------------------------------------------------------------------
# 4. Latest journey.

# Few distinct instants, so that many events tie on occurred_s and the event_id must decide.
tied_times = st.sampled_from([BASE_S, BASE_S + 1.0, BASE_S + 60.0, BASE_S - DAY])


@STREAM_SETTINGS
@given(events=event_lists(times=tied_times), data=st.data())
def test_latest_journey_is_that_of_the_greatest_occurred_time_then_event_id(events, data):
    hl = DEFAULT_HALF_LIVES
    shuffled = data.draw(st.permutations(events), label="shuffled")
    partials = [fold(batch, hl) for batch in draw_batches(data, shuffled)]
    customers = merge_in_random_tree(data, partials, hl)[1]

    for customer, state in customers.items():
        latest = max((e for e in events if e.customer_id == customer), key=lambda e: (e.occurred_s, e.event_id))
        assert state.latest_journey == latest.journey
        assert state.latest_event_id == latest.event_id
        assert state.ref_s == latest.occurred_s


def test_latest_journey_breaks_a_tie_of_occurred_time_by_event_id():
    def event(event_id: str, journey: str, occurred_s: float) -> ScoredEvent:
        return ScoredEvent(event_id, "c", journey, "s", "t", "web", occurred_s, 5.0, 5.0, 5.0, 1.0)

    early_big_id = event("z", "hotel", BASE_S - 1)
    tie_small_id = event("a", "airline", BASE_S)
    tie_big_id = event("b", "telecom", BASE_S)
    for order in ([early_big_id, tie_small_id, tie_big_id], [tie_big_id, tie_small_id, early_big_id]):
        customers, _ = merge_customer_events(order, DEFAULT_HALF_LIVES)
        assert customers["c"].latest_journey == "telecom"
        assert customers["c"].latest_event_id == "b"


# --------------------------------------------------------------------------------------------
# 5. Quadrants.


def naive_quadrant(index: float, revenue: float, index_threshold: float, revenue_threshold: float) -> str:
    return {
        (True, True): "exemplary",
        (True, False): "growth",
        (False, True): "at_risk",
        (False, False): "disengaged",
    }[(index >= index_threshold, revenue >= revenue_threshold)]


INDEX_THRESHOLD = 0.0
REVENUE_THRESHOLD = 1000.0


def around(value: float) -> list[float]:
    return [value - 1, math.nextafter(value, -math.inf), value, math.nextafter(value, math.inf), value + 1]


@pytest.mark.parametrize(
    ("index", "revenue"), list(product(around(INDEX_THRESHOLD), around(REVENUE_THRESHOLD)))
)
def test_quadrant_boundaries_table(index, revenue):
    expected = naive_quadrant(index, revenue, INDEX_THRESHOLD, REVENUE_THRESHOLD)
    assert quadrant(index, revenue, INDEX_THRESHOLD, REVENUE_THRESHOLD) == expected


@pytest.mark.parametrize(
    ("index", "revenue", "expected"),
    [
        (0.0, 1000.0, "exemplary"),  # both exactly at the thresholds: >= on both axes
        (0.0, 999.99, "growth"),
        (-0.01, 1000.0, "at_risk"),
        (-0.01, 999.99, "disengaged"),
        (10.0, 0.0, "growth"),
        (-10.0, 1e9, "at_risk"),
    ],
)
def test_quadrant_named_cases(index, revenue, expected):
    assert quadrant(index, revenue, INDEX_THRESHOLD, REVENUE_THRESHOLD) == expected


@PROPERTY_SETTINGS
@given(
    index=st.floats(-10, 10),
    revenue=st.floats(0, 1e7),
    index_threshold=st.floats(-10, 10),
    revenue_threshold=st.floats(0, 1e7),
)
@example(index=1.0, revenue=5.0, index_threshold=1.0, revenue_threshold=5.0)
def test_quadrant_follows_the_threshold_rule(index, revenue, index_threshold, revenue_threshold):
    assert quadrant(index, revenue, index_threshold, revenue_threshold) == naive_quadrant(
        index, revenue, index_threshold, revenue_threshold
    )


# --------------------------------------------------------------------------------------------
# 6. Gap histogram and percentiles.

gaps = st.one_of(st.floats(-10.0, 10.0), st.integers(-20, 20).map(lambda k: k / 2))


@PROPERTY_SETTINGS
@given(gap=gaps)
@example(gap=-10.0)
@example(gap=10.0)
@example(gap=0.0)
@example(gap=-0.0)
@example(gap=9.5)
@example(gap=math.nextafter(10.0, 0.0))
def test_every_gap_in_range_lands_in_its_bin(gap):
    index = gap_bin(gap)
    assert 0 <= index < GAP_HISTOGRAM_BINS
    low = GAP_HISTOGRAM_MIN + index * GAP_HISTOGRAM_BIN_WIDTH
    high = low + GAP_HISTOGRAM_BIN_WIDTH
    # Bins are [low, high), except the last, which also holds +10. The 1e-12 allows for the
    # rounding of gap + 10: a gap within ~1e-15 below a bin edge can land in the next bin up.
    assert low - 1e-12 <= gap <= high + 1e-12
    if index < GAP_HISTOGRAM_BINS - 1:
        assert gap < high
    if gap >= 0:
        assert index >= GAP_HISTOGRAM_BINS // 2


def test_the_extreme_gaps_land_in_the_first_and_last_bins():
    assert gap_bin(-10.0) == 0
    assert gap_bin(-9.5) == 1
    assert gap_bin(0.0) == 20
    assert gap_bin(-0.5) == 19
    assert gap_bin(9.5) == 39
    assert gap_bin(10.0) == 39
    assert GAP_HISTOGRAM_MIN + GAP_HISTOGRAM_BINS * GAP_HISTOGRAM_BIN_WIDTH == 10.0


def histogram_of(values: list[float]) -> list[int]:
    histogram = [0] * GAP_HISTOGRAM_BINS
    for value in values:
        histogram[gap_bin(value)] += 1
    return histogram


@PROPERTY_SETTINGS
@given(values=st.lists(gaps, min_size=1, max_size=200))
@example(values=[-10.0])
@example(values=[10.0])
@example(values=[-10.0, 10.0])
@example(values=[-10.0] * 7 + [10.0] * 43)
@example(values=[-10.0] * 5 + [10.0] * 45)
def test_histogram_percentiles_lie_within_one_bin_of_the_nearest_rank_percentile(values):
    histogram = histogram_of(values)
    assert sum(histogram) == len(values)
    lowest = GAP_HISTOGRAM_MIN + gap_bin(min(values)) * GAP_HISTOGRAM_BIN_WIDTH
    highest = GAP_HISTOGRAM_MIN + (gap_bin(max(values)) + 1) * GAP_HISTOGRAM_BIN_WIDTH
    previous = -math.inf
    for quantile, exact in ((0.10, Fraction(1, 10)), (0.50, Fraction(1, 2)), (0.90, Fraction(9, 10))):
        percentile = histogram_percentile(histogram, quantile)
        assert lowest <= percentile <= highest
        assert abs(percentile - nearest_rank(values, exact)) <= GAP_HISTOGRAM_BIN_WIDTH + 1e-9
        assert percentile >= previous
        previous = percentile


@PROPERTY_SETTINGS
@given(values=st.lists(gaps, min_size=1, max_size=100), quantiles=st.lists(st.floats(0.0, 1.0), min_size=2))
def test_histogram_percentile_is_monotone_in_the_quantile_and_bounded_by_the_data(values, quantiles):
    histogram = histogram_of(values)
    lowest = GAP_HISTOGRAM_MIN + gap_bin(min(values)) * GAP_HISTOGRAM_BIN_WIDTH
    highest = GAP_HISTOGRAM_MIN + (gap_bin(max(values)) + 1) * GAP_HISTOGRAM_BIN_WIDTH
    results = [histogram_percentile(histogram, q) for q in sorted(quantiles)]
    assert results == sorted(results)
    assert all(lowest <= p <= highest for p in results)


def test_percentiles_of_no_data_are_none_and_empty_stage_stats_are_empty():
    assert histogram_percentile([0] * GAP_HISTOGRAM_BINS, 0.5) is None
    stats = stage_stats(StageBucket(), promise=None)
    assert stats.events == 0
    assert stats.revenue == 0.0
    assert all(value is None for name, value in stats.to_dict().items() if name not in ("events", "revenue"))


@STREAM_SETTINGS
@given(events=event_lists())
def test_stage_stats_equal_the_naive_figures_of_the_window(events):
    assert_stage_stats_match(bucket_events(events), events)


@STREAM_SETTINGS
@given(events=event_lists())
def test_buckets_split_events_by_minute_of_occurrence(events):
    for (journey, stage, touchpoint, channel, minute), bucket in bucket_events(events).items():
        assert minute % 60 == 0
        members = [
            e
            for e in events
            if (e.journey, e.stage, e.touchpoint, e.channel) == (journey, stage, touchpoint, channel)
            and minute <= e.occurred_s < minute + 60
        ]
        assert bucket.events == len(members) > 0
        assert all(minute_of(e.occurred_s) == minute for e in members)


# --------------------------------------------------------------------------------------------
# 7. Decay and rebasing.


def one_event(event_id: str, occurred_s: float, gap: float, weight: float = 1.0, revenue: float = 0.0) -> ScoredEvent:
    expectation = 5.0
    return ScoredEvent(
        event_id, "c", "hotel", "stay", "room", "app", occurred_s, expectation + gap, expectation, 0.0, weight,
        revenue=revenue,
    )  # fmt: skip


@PROPERTY_SETTINGS
@given(
    newer_s=st.floats(BASE_S - SPAN_S / 2, BASE_S + SPAN_S / 2),
    newer_gap=st.floats(-5, 5),
    older_gap=st.floats(-5, 5),
    weight=stage_weights,
    newer_first=st.booleans(),
)
def test_an_event_one_half_life_older_has_half_the_weight(newer_s, newer_gap, older_gap, weight, newer_first):
    hl = DEFAULT_HALF_LIVES
    newer = one_event("n", newer_s, newer_gap, weight)
    older_index = one_event("o", newer_s - hl.index_s, older_gap, weight)  # 30 days older
    older_trend = one_event("o", newer_s - hl.trend_s, older_gap, weight)  # 7 days older

    pair = [newer, older_index] if newer_first else [older_index, newer]
    customers, stages = merge_customer_events(pair, hl)
    state = customers["c"]
    assert close(state.index_weight_sum, weight * 1.5, rel=1e-12)
    assert close(state.experience_index, (newer_gap + 0.5 * older_gap) / 1.5, rel=1e-12, abs_=1e-12)
    [stage_state] = stages.values()
    assert close(stage_state.weight_sum, 1.5, rel=1e-12)
    assert close(stage_state.gap, (newer_gap + 0.5 * older_gap) / 1.5, rel=1e-12, abs_=1e-12)

    customers, _ = merge_customer_events([older_trend, newer] if newer_first else [newer, older_trend], hl)
    short = (newer_gap + 0.5 * older_gap) / 1.5
    assert close(customers["c"].trend_weight_sum, weight * 1.5, rel=1e-12)
    assert close(customers["c"].trend + customers["c"].experience_index, short, rel=1e-12, abs_=1e-12)


@STREAM_SETTINGS
@given(events=event_lists(), later_s=st.floats(0, 3 * 365 * DAY), periods=st.integers(0, 12))
def test_revenue_halves_every_revenue_half_life(events, later_s, periods):
    hl = DEFAULT_HALF_LIVES
    customers, _ = merge_customer_events(events, hl)
    for customer, state in customers.items():
        evs = [e for e in events if e.customer_id == customer]
        now = state.ref_s + later_s
        value = state.revenue_at(now, hl.revenue_s)
        assert close(value, naive_revenue_at(evs, now, hl.revenue_s), abs_=1e-6)
        assert close(state.revenue_at(now + hl.revenue_s, hl.revenue_s), value / 2, rel=1e-12, abs_=1e-300)
        assert close(
            state.revenue_at(now + periods * hl.revenue_s, hl.revenue_s), value * 2.0**-periods, rel=1e-12, abs_=1e-300
        )
        # At the customer's latest event, nothing has decayed yet relative to the stored sum.
        assert state.revenue_at(state.ref_s, hl.revenue_s) == state.revenue_sum


years = st.floats(0.0, 40 * 365 * DAY)


@STREAM_SETTINGS
@given(
    events=event_lists(times=years.map(lambda s: 1.0e9 + s)),
    half_lives=half_lives_choices,
    data=st.data(),
)
def test_rebasing_keeps_weights_at_most_one_over_years_of_events(events, half_lives, data):
    shuffled = data.draw(st.permutations(events), label="shuffled")
    partials = [fold(batch, half_lives) for batch in draw_batches(data, shuffled)]
    merged = merge_in_random_tree(data, partials, half_lives)
    _, customers, stages = merged

    for customer, state in customers.items():
        evs = [e for e in events if e.customer_id == customer]
        latest_weights = [e.weight for e in evs if e.occurred_s == state.ref_s]
        for name in CUSTOMER_SUMS:
            assert math.isfinite(getattr(state, name)), name
        # Every event's decayed weight is <= 1, and the latest ones weigh exactly 1.
        assert min(latest_weights) - 1e-12 <= state.index_weight_sum <= math.fsum(e.weight for e in evs) * (1 + 1e-12)
        assert min(latest_weights) - 1e-12 <= state.trend_weight_sum <= math.fsum(e.weight for e in evs) * (1 + 1e-12)
        assert 0.0 <= state.revenue_sum <= math.fsum(e.revenue for e in evs) * (1 + 1e-12)
        gaps_ = [e.gap for e in evs]
        assert min(gaps_) - 1e-9 <= state.experience_index <= max(gaps_) + 1e-9
        assert -20 - 1e-9 <= state.trend <= 20 + 1e-9
        now = state.ref_s + 5 * 365 * DAY
        assert close(state.revenue_at(now, half_lives.revenue_s), naive_revenue_at(evs, now, half_lives.revenue_s))
    for state in stages.values():
        assert 1.0 - 1e-12 <= state.weight_sum <= state.events * (1 + 1e-12)
        assert math.isfinite(state.gap_sum)
    assert_matches_naive(merged, events, half_lives)


@PROPERTY_SETTINGS
@given(
    a=st.lists(st.tuples(occurred_times, revenues), min_size=1, max_size=10),
    b=st.lists(st.tuples(occurred_times, revenues), min_size=1, max_size=10),
    now_offset=st.floats(0, 365 * DAY),
)
def test_revenue_rank_orders_customers_like_their_revenue_at_any_time(a, b, now_offset):
    hl = DEFAULT_HALF_LIVES

    def state_of(prefix: str, sales: list[tuple[float, float]]) -> CustomerState:
        events = [one_event(f"{prefix}{i}", t, 0.0, revenue=r) for i, (t, r) in enumerate(sales)]
        return merge_customer_events(events, hl)[0]["c"]

    x, y = state_of("x", a), state_of("y", b)
    now = max(x.ref_s, y.ref_s) + now_offset
    rx, ry = x.revenue_at(now, hl.revenue_s), y.revenue_at(now, hl.revenue_s)
    kx, ky = revenue_rank(x.revenue_sum, x.ref_s, hl.revenue_s), revenue_rank(y.revenue_sum, y.ref_s, hl.revenue_s)
    assume(not close(rx, ry, rel=1e-9, abs_=0.0))
    assert (rx > ry) == (kx > ky)
