"""The traffic simulator: valid, deterministic, realistic events, and a poster that paces and retries."""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import httpx
import orjson
import pytest

from services.core.events import TouchpointRecord, ValidationContext, parse_occurred_at, validate_event
from services.core.journeys import load_journeys
from services.core.scoring import quadrant
from services.core.settings import DEFAULT_JOURNEYS_DIR
from services.simulator import Incident, JourneySimulator, default_incident, run_simulation

JOURNEYS = load_journeys(DEFAULT_JOURNEYS_DIR)
START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
RATE = 50  # events per second, one call per simulated second

TimedEvent = tuple[datetime, dict]


def simulate(simulator: JourneySimulator, seconds: int, rate: int = RATE) -> list[TimedEvent]:
    """Drive the simulator like the poster does: `rate` events for each second of the clock."""
    events = []
    for second in range(seconds):
        now = START + timedelta(seconds=second)
        events.extend((now, event) for event in simulator.next_events(now, rate))
    return events


def validate(timed_events: list[TimedEvent]) -> list[TouchpointRecord]:
    def context(now: datetime) -> ValidationContext:
        return ValidationContext(
            tenant="t", journeys=JOURNEYS, now=now, max_event_age_s=30 * 86400, max_future_skew_s=300
        )

    return [validate_event(event, context(now)) for now, event in timed_events]


def gap_stats(records: list[TouchpointRecord]) -> tuple[float, float]:
    gaps = [record.gap for record in records]
    return statistics.fmean(gaps), sum(gap < 0 for gap in gaps) / len(gaps)


@pytest.fixture(scope="module")
def first_minute() -> tuple[JourneySimulator, list[TimedEvent], list[TouchpointRecord]]:
    """One minute of `cem dev --simulate` at 50 events/s: every journey, the default incident."""
    simulator = JourneySimulator(JOURNEYS, seed=11, incident=default_incident(JOURNEYS))
    events = simulate(simulator, 60)
    return simulator, events, validate(events)


# ---- validity


def test_every_event_is_valid_for_the_ingest_api(first_minute):
    _, events, records = first_minute
    assert len(records) == len(events) == 60 * RATE
    assert len({event["event_id"] for _, event in events}) == len(events)
    assert {record.journey for record in records} == set(JOURNEYS)


def test_events_happened_up_to_five_seconds_before_now_with_an_offset(first_minute):
    _, events, _ = first_minute
    for now, event in events:
        occurred_at = parse_occurred_at(event["occurred_at"])
        assert occurred_at.utcoffset() is not None
        assert timedelta(0) <= now - occurred_at <= timedelta(seconds=5)


def test_channels_follow_obvious_touchpoints(first_minute):
    _, events, _ = first_minute
    expected = {"web": "web", "app": "app", "call-centre": "call_centre", "rental-counter": "in_person"}
    seen = set()
    for _, event in events:
        if event.get("touchpoint") in expected:
            assert event["channel"] == expected[event["touchpoint"]]
            seen.add(event["touchpoint"])
    assert seen == set(expected)


def test_sources_are_mostly_surveys_and_behavioural_signals(first_minute):
    _, events, _ = first_minute
    sources = Counter(event["source"] for _, event in events)
    assert (sources["survey"] + sources["behavioural"]) / len(events) > 0.7
    assert sources["review"] > 0 and sources["mystery_shopper"] > 0


def test_some_events_use_the_five_point_scale(first_minute):
    _, events, _ = first_minute
    five_point = [event for _, event in events if "scale" in event]
    assert 0.10 <= len(five_point) / len(events) <= 0.20
    for event in five_point:
        assert event["scale"] == {"min": 1, "max": 5}
        for name in ("experience", "expectation"):
            if name in event:
                assert 1 <= event[name] <= 5 and (event[name] * 2).is_integer()


def test_expectation_is_sometimes_given_and_otherwise_the_promise(first_minute):
    _, events, records = first_minute
    with_expectation = sum("expectation" in event for _, event in events) / len(events)
    assert 0.2 < with_expectation < 0.6
    for (_, event), record in zip(events, records):
        if "expectation" not in event:
            assert record.expectation == record.promise


def test_emotion_follows_the_gap(first_minute):
    _, _, records = first_minute
    by_emotion = defaultdict(list)
    for record in records:
        if record.emotion:
            by_emotion[record.emotion].append(record.gap)
    negative = [gap for emotion in ("annoyed", "frustrated", "angry") for gap in by_emotion[emotion]]
    positive = [gap for emotion in ("pleased", "delighted") for gap in by_emotion[emotion]]
    assert statistics.fmean(negative) < -1.0 < 0.5 < statistics.fmean(positive)
    assert statistics.fmean(by_emotion["angry"]) < statistics.fmean(by_emotion["annoyed"])


# ---- determinism and walking


def test_the_same_seed_and_clock_give_the_same_events():
    first = simulate(JourneySimulator(JOURNEYS, seed=3, incident=default_incident(JOURNEYS)), 30)
    second = simulate(JourneySimulator(JOURNEYS, seed=3, incident=default_incident(JOURNEYS)), 30)
    other_seed = simulate(JourneySimulator(JOURNEYS, seed=4, incident=default_incident(JOURNEYS)), 30)
    assert first == second
    assert [event for _, event in first] != [event for _, event in other_seed]


def test_event_ids_differ_between_runs_started_at_different_times():
    earlier = JourneySimulator(JOURNEYS, seed=3).next_events(START, 5)
    later = JourneySimulator(JOURNEYS, seed=3).next_events(START + timedelta(hours=1), 5)
    assert not {event["event_id"] for event in earlier} & {event["event_id"] for event in later}


def test_customers_walk_their_journey_stage_by_stage(first_minute):
    _, events, _ = first_minute
    last_stage: dict[str, tuple[str, int]] = {}
    repeat_visits = 0
    for _, event in events:
        stage_ids = JOURNEYS[event["journey"]].stage_ids
        index = stage_ids.index(event["stage"])
        previous = last_stage.get(event["customer_id"])
        if previous is not None:
            journey, previous_index = previous
            assert journey == event["journey"]
            assert index == (previous_index + 1) % len(stage_ids)
            repeat_visits += 1
        last_stage[event["customer_id"]] = (event["journey"], index)
    assert repeat_visits > 500


def test_a_journey_can_be_simulated_alone():
    simulator = JourneySimulator(JOURNEYS, ["telecom"], customers=50, seed=1)
    events = simulate(simulator, 5, rate=20)
    assert {event["journey"] for _, event in events} == {"telecom"}
    assert len({event["customer_id"] for _, event in events}) <= 50 + 20  # leavers are replaced
    with pytest.raises(ValueError, match="unknown journey 'cruise'"):
        JourneySimulator(JOURNEYS, ["cruise"])


# ---- stage quality and incidents


def test_without_an_incident_no_stage_breaks_its_alert_rule():
    simulator = JourneySimulator(JOURNEYS, seed=5)
    records = validate(simulate(simulator, 240))
    by_stage = defaultdict(list)
    for record in records:
        by_stage[(record.journey, record.stage)].append(record)
    profiles = simulator.stage_profiles()
    for (journey_id, stage_id), stage_records in by_stage.items():
        rule = JOURNEYS[journey_id].stage(stage_id).alert
        mean_gap, shortfall_rate = gap_stats(stage_records)
        assert mean_gap > rule.mean_gap_below + 1.0, (journey_id, stage_id)
        assert shortfall_rate < rule.shortfall_rate_above, (journey_id, stage_id)
    # Most stages keep their promise; one or two per journey chronically fall slightly short.
    for journey_id in JOURNEYS:
        weak = [key for key, profile in profiles.items() if key[0] == journey_id and profile == "weak"]
        assert 1 <= len(weak) <= 2
    weak_means = [gap_stats(by_stage[key])[0] for key, profile in profiles.items() if profile == "weak"]
    strong_means = [gap_stats(by_stage[key])[0] for key, profile in profiles.items() if profile == "strong"]
    assert statistics.fmean(weak_means) < 0.1 < 0.5 < statistics.fmean(strong_means)


def test_the_incident_stage_breaks_its_alert_rule_only_during_each_incident():
    incident = Incident("car-rental", "pickup", start_after_s=10, duration_s=60, period_s=150, severity=4.0)
    simulator = JourneySimulator(JOURNEYS, ["car-rental"], seed=9, incident=incident)
    records = [record for record in validate(simulate(simulator, 400, rate=20)) if record.stage == "pickup"]
    rule = JOURNEYS["car-rental"].stage("pickup").alert

    windows: dict[int | None, list[TouchpointRecord]] = defaultdict(list)
    for record in records:
        elapsed_s = (record.occurred_at - START).total_seconds()
        window = None
        if incident.active_at(elapsed_s):
            window = int((elapsed_s - incident.start_after_s) // incident.period_s)
        windows[window].append(record)
    assert sorted(key for key in windows if key is not None) == [0, 1, 2]  # it recurs
    for window, window_records in windows.items():
        mean_gap, shortfall_rate = gap_stats(window_records)
        if window is None:
            assert mean_gap > rule.mean_gap_below and shortfall_rate < rule.shortfall_rate_above
        else:
            assert len(window_records) >= rule.min_events
            assert mean_gap < rule.mean_gap_below and shortfall_rate > rule.shortfall_rate_above


def test_within_a_minute_the_incident_stage_shows_a_clear_shortfall(first_minute):
    simulator, _, records = first_minute
    incident = simulator.incidents[0]
    assert (incident.journey, incident.stage) == ("car-rental", "pickup")
    rule = JOURNEYS["car-rental"].stage("pickup").alert
    pickup = [record for record in records if (record.journey, record.stage) == ("car-rental", "pickup")]
    mean_gap, shortfall_rate = gap_stats(pickup)
    assert len(pickup) >= rule.min_events
    # The stage alert fires on either limit: the shortfall rate crosses it within 40 s of the
    # incident; the mean gap, diluted by the 20 calm seconds before, is clearly negative already.
    assert shortfall_rate > rule.shortfall_rate_above
    assert mean_gap < -0.5


def test_incidents_bring_hot_events_from_high_revenue_customers():
    incident = Incident("car-rental", "pickup", start_after_s=60, duration_s=120, period_s=None)
    simulator = JourneySimulator(JOURNEYS, ["car-rental"], customers=500, seed=2, incident=incident)
    records = validate(simulate(simulator, 180))
    threshold = JOURNEYS["car-rental"].revenue_threshold
    revenue: dict[str, float] = defaultdict(float)
    hot = []
    for record in records:
        if record.gap <= -5 and revenue[record.customer_id] >= threshold:
            hot.append(record)
        revenue[record.customer_id] += record.revenue or 0.0
    from_incident = [
        record for record in hot if record.stage == "pickup" and simulator.active_incidents(record.occurred_at)
    ]
    assert len(from_incident) >= 5
    assert len(from_incident) > 2 * (len(hot) - len(from_incident))  # service failures elsewhere are rarer


# ---- customers and revenue


def customer_positions(records: list[TouchpointRecord]) -> dict[str, tuple[float, float, str]]:
    """Per customer: experience index (stage-weighted mean gap), revenue and journey of the latest event."""
    sums: dict[str, list] = {}
    for record in records:
        weighted_gap, weight, revenue, _ = sums.get(record.customer_id, [0.0, 0.0, 0.0, ""])
        sums[record.customer_id] = [
            weighted_gap + record.weight * record.gap, weight + record.weight, revenue + (record.revenue or 0.0),
            record.journey,
        ]  # fmt: skip
    return {customer: (gap / weight, revenue, journey) for customer, (gap, weight, revenue, journey) in sums.items()}


def test_within_a_minute_at_50_events_per_second_all_four_quadrants_are_populated(first_minute):
    _, _, records = first_minute
    quadrants = Counter(
        quadrant(index, revenue, JOURNEYS[journey].experience_threshold, JOURNEYS[journey].revenue_threshold)
        for index, revenue, journey in customer_positions(records).values()
    )
    assert set(quadrants) == {"exemplary", "growth", "at_risk", "disengaged"}
    assert quadrants["at_risk"] >= 3


def test_revenue_is_heavy_tailed_with_customers_on_both_sides_of_the_threshold():
    simulator = JourneySimulator(JOURNEYS, ["car-rental", "hotel"], customers=1000, seed=4)
    records = validate(simulate(simulator, 200))  # 10 events per customer: about one pass each
    positions = customer_positions(records)
    paying = sorted((revenue for _, revenue, _ in positions.values() if revenue > 0), reverse=True)
    above = sum(revenue >= JOURNEYS[journey].revenue_threshold for _, revenue, journey in positions.values())
    assert 0.10 <= above / len(positions) <= 0.30
    # Heavy tail: the top tenth of the paying customers bring a third of the revenue or more.
    assert sum(paying[: len(paying) // 10]) / sum(paying) > 0.33
    revenue_stages = {(record.journey, record.stage) for record in records if record.revenue is not None}
    assert revenue_stages == {
        ("car-rental", "reservation"), ("car-rental", "billing"), ("hotel", "booking"), ("hotel", "check-out"),
    }  # fmt: skip
    quadrants = Counter(
        quadrant(index, revenue, 0.0, JOURNEYS[journey].revenue_threshold)
        for index, revenue, journey in positions.values()
    )
    assert min(quadrants[name] for name in ("exemplary", "growth", "at_risk", "disengaged")) / len(positions) > 0.02


def test_default_incidents_hit_the_stage_of_each_seed_case():
    assert default_incident(JOURNEYS) == Incident("car-rental", "pickup")
    assert default_incident(JOURNEYS, ["telecom"]).stage == "use-network"
    assert default_incident(JOURNEYS, ["hotel", "airline"]).stage == "check-in"
    with pytest.raises(ValueError, match="is not simulated"):
        JourneySimulator(JOURNEYS, ["hotel"], incident=Incident("car-rental", "pickup"))


# ---- the poster


class FakeIngest:
    """An ingest API answering from a script of statuses (or exceptions), then 202."""

    def __init__(self, script: list[int | Exception] | None = None):
        self.script = list(script or [])
        self.batches: list[list[dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/v1/events:batch"
        events = orjson.loads(request.content)["events"]
        self.batches.append(events)
        step = self.script.pop(0) if self.script else 202
        if isinstance(step, Exception):
            raise step
        if step != 202:
            return httpx.Response(step, headers={"Retry-After": "0"}, json={"detail": "broker unavailable"})
        results = [
            {"index": index, "event_id": event["event_id"], "status": "accepted"} for index, event in enumerate(events)
        ]
        return httpx.Response(202, json={"accepted": len(events), "rejected": 0, "results": results})


def small_simulator() -> JourneySimulator:
    return JourneySimulator(JOURNEYS, customers=100, seed=1)


async def test_run_simulation_posts_batches_at_the_target_rate():
    ingest = FakeIngest()
    stats = await run_simulation(
        "http://ingest.test/", small_simulator(), rate=400, duration_s=0.6, batch_size=100,
        transport=httpx.MockTransport(ingest),
    )  # fmt: skip
    assert all(len(batch) == 100 for batch in ingest.batches)
    assert 200 <= stats.events <= 300  # ticks at 0, 0.25 and 0.5 s
    assert stats.accepted == stats.events == sum(map(len, ingest.batches))
    assert stats.rejected == stats.failed == 0


async def test_unavailable_ingest_is_retried_with_the_same_events():
    ingest = FakeIngest([503, 429])
    stats = await run_simulation(
        "http://ingest.test", small_simulator(), rate=50, duration_s=0.2, transport=httpx.MockTransport(ingest)
    )
    assert len(ingest.batches) == 3
    assert ingest.batches[0] == ingest.batches[1] == ingest.batches[2]
    assert (stats.events, stats.accepted, stats.retries, stats.failed) == (50, 50, 2, 0)


async def test_connection_errors_while_ingest_starts_are_retried_with_backoff():
    refused = httpx.ConnectError("connection refused")
    ingest = FakeIngest([refused, refused, refused])
    stats = await run_simulation(
        "http://ingest.test", small_simulator(), rate=50, duration_s=0.2, backoff_s=0.01,
        transport=httpx.MockTransport(ingest),
    )  # fmt: skip
    assert (stats.accepted, stats.retries, stats.failed) == (50, 3, 0)


async def test_a_batch_is_given_up_after_the_last_attempt():
    ingest = FakeIngest([503] * 10)
    stats = await run_simulation(
        "http://ingest.test", small_simulator(), rate=50, duration_s=0.2, max_attempts=3,
        transport=httpx.MockTransport(ingest),
    )  # fmt: skip
    assert len(ingest.batches) == 3
    assert (stats.accepted, stats.failed) == (0, 50)


async def test_rejected_events_are_counted():
    def reject_all(request: httpx.Request) -> httpx.Response:
        events = orjson.loads(request.content)["events"]
        results = [
            {"index": index, "event_id": event["event_id"], "status": "rejected", "errors": []}
            for index, event in enumerate(events)
        ]
        return httpx.Response(422, json={"accepted": 0, "rejected": len(events), "results": results})

    stats = await run_simulation(
        "http://ingest.test", small_simulator(), rate=50, duration_s=0.2, transport=httpx.MockTransport(reject_all)
    )
    assert (stats.accepted, stats.rejected, stats.failed) == (0, 50, 0)


async def test_run_simulation_stops_when_asked():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)
    stats = await run_simulation(
        "http://ingest.test", small_simulator(), rate=100, stop=stop, batch_size=10,
        transport=httpx.MockTransport(FakeIngest()),
    )  # fmt: skip
    assert 0.25 <= stats.elapsed_s < 1.0
    assert 20 <= stats.accepted <= 50
