"""The query API over real Postgres: every figure checked against a naive computation on the events.

The aggregate tables are the API's contract: the tests write them directly, with the values the pure
scoring maths gives for a set of generated events, then read them through the HTTP endpoints with the
clock pinned at NOW.
"""

from __future__ import annotations

import math
import random
import statistics
import uuid
import xml.etree.ElementTree as ElementTree
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import yaml

from services.api.app import create_app
from services.api.deps import get_now
from services.core.db.engine import create_engine
from services.core.db.schema import customer_stages, customers, stage_buckets
from services.core.embedded import free_port
from services.core.journeys import load_journeys
from services.core.scoring import (
    NEGATIVE_EMOTIONS,
    QUADRANTS,
    CustomerState,
    HalfLives,
    ScoredEvent,
    StageBucket,
    bucket_events,
    from_epoch_seconds,
    merge_customer_events,
    minute_of,
    quadrant,
    revenue_rank,
    stage_stats,
)
from services.core.settings import DEFAULT_JOURNEYS_DIR, Settings

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 2, 12, 30, 20, 500_000, tzinfo=timezone.utc)
NOW_S = NOW.timestamp()
MINUTE, HOUR, DAY = 60.0, 3600.0, 86_400.0
JOURNEYS = load_journeys(DEFAULT_JOURNEYS_DIR)
USED_JOURNEYS = ("car-rental", "hotel")
CHANNELS = ("web", "app", "in_person", "call_centre", "")
EMOTIONS = (None, "delighted", "pleased", "neutral", "annoyed", "frustrated", "angry")
TIED_CUSTOMERS = [f"tie-{index}" for index in range(5)]
ODD_CUSTOMERS = ["c/with/slash", "Kim Min-jun ✓", "a b&c?d=e#f"]


def close(value: float | None, expected: float | None, tolerance: float = 1e-9) -> bool:
    if value is None or expected is None:
        return value is None and expected is None
    return math.isclose(value, expected, rel_tol=tolerance, abs_tol=tolerance)


# --------------------------------------------------------------------------------------------
# Data: generated events, and the aggregate rows scoring would have written for them.


def generate_events(rng: random.Random) -> list[ScoredEvent]:
    events = []
    regular = [f"c-{index:03d}" for index in range(150)] + ODD_CUSTOMERS
    # Each customer has a usual experience (above or below expectations) and a usual spend, so
    # that every quadrant of the positioning map has customers.
    mood = {customer_id: rng.uniform(-3, 3) for customer_id in regular}
    spend = {customer_id: rng.uniform(0, 300) for customer_id in regular}
    for index in range(2400):
        customer_id = rng.choice(regular)
        journey = JOURNEYS[rng.choice(USED_JOURNEYS)]
        stage = rng.choice(journey.stages[:-1])  # the last stage stays without events
        # Recent events are dense, so that short windows have something to show; a few are in
        # the future (clock skew up to 5 min) and a few older than the longest window.
        age_s = rng.choice(
            [rng.uniform(-4 * MINUTE, 10 * MINUTE), rng.uniform(0, 2 * HOUR), rng.uniform(0, 2 * DAY),
             rng.uniform(0, 10 * DAY), rng.uniform(0, 40 * DAY)]
        )  # fmt: skip
        expectation = stage.promise if rng.random() < 0.5 else round(rng.uniform(3, 10), 1)
        experience = min(10.0, max(0.0, round(expectation + mood[customer_id] + rng.gauss(0, 2), 1)))
        events.append(
            ScoredEvent(
                event_id=f"e-{index:05d}",
                customer_id=customer_id,
                journey=journey.id,
                stage=stage.id,
                touchpoint=rng.choice([*stage.touchpoints, "", "unmapped-desk"]),
                channel=rng.choice(CHANNELS),
                occurred_s=round(NOW_S - age_s, 3),
                experience=experience,
                expectation=expectation,
                promise=stage.promise,
                weight=stage.weight,
                emotion=rng.choice(EMOTIONS),
                revenue=0.0 if rng.random() < 0.4 else round(rng.uniform(0, 2 * spend[customer_id]), 2),
            )
        )
    # Customers who tie on every sort key: one identical event each, at the same time, no revenue.
    stage = JOURNEYS["hotel"].stages[0]
    for index, customer_id in enumerate(TIED_CUSTOMERS):
        events.append(
            ScoredEvent(f"tie-{index}", customer_id, "hotel", stage.id, "", "", NOW_S - 3 * HOUR, 6.0, 7.0,
                        stage.promise, stage.weight)  # fmt: skip
        )
    return events


@dataclass
class Dataset:
    settings: Settings
    events: list[ScoredEvent]
    states: dict[str, CustomerState]
    quadrants: dict[str, str]


def half_lives(settings: Settings) -> HalfLives:
    return HalfLives(settings.customer_half_life_s, settings.trend_half_life_s, settings.revenue_half_life_s)


async def write_aggregates(settings: Settings, events: list[ScoredEvent]) -> Dataset:
    """Write what the scoring consumer would have written for `events`, using its pure maths."""
    tenant = settings.tenant
    bucket_rows = [
        {"tenant": tenant, "journey": journey, "stage": stage, "touchpoint": touchpoint, "channel": channel,
         "minute": from_epoch_seconds(minute), **bucket.__dict__}
        for (journey, stage, touchpoint, channel, minute), bucket in bucket_events(events).items()
    ]  # fmt: skip
    states, stage_states = merge_customer_events(events, half_lives(settings))
    quadrants = {}
    customer_rows = []
    for customer_id, state in states.items():
        journey = JOURNEYS[state.latest_journey]
        quadrants[customer_id] = quadrant(
            state.experience_index, state.revenue_sum, journey.experience_threshold, journey.revenue_threshold
        )
        customer_rows.append(
            {"tenant": tenant, "customer_id": customer_id, "last_event_at": from_epoch_seconds(state.ref_s),
             "first_event_at": from_epoch_seconds(state.first_event_s), "latest_journey": state.latest_journey,
             "latest_event_id": state.latest_event_id, "index_gap_sum": state.index_gap_sum,
             "index_weight_sum": state.index_weight_sum, "trend_gap_sum": state.trend_gap_sum,
             "trend_weight_sum": state.trend_weight_sum, "revenue_sum": state.revenue_sum, "events": state.events,
             "experience_index": state.experience_index, "trend": state.trend,
             "revenue_rank": revenue_rank(state.revenue_sum, state.ref_s, settings.revenue_half_life_s),
             "quadrant": quadrants[customer_id], "updated_at": NOW - timedelta(seconds=1)}
        )  # fmt: skip
    stage_rows = [
        {"tenant": tenant, "customer_id": customer_id, "journey": journey, "stage": stage,
         "last_event_at": from_epoch_seconds(state.ref_s), "gap_sum": state.gap_sum,
         "weight_sum": state.weight_sum, "events": state.events}
        for (customer_id, journey, stage), state in stage_states.items()
    ]  # fmt: skip
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as connection:
            for table, rows in (
                (stage_buckets, bucket_rows), (customers, customer_rows), (customer_stages, stage_rows)
            ):  # fmt: skip
                await connection.execute(table.insert(), rows)
    finally:
        await engine.dispose()
    return Dataset(settings, events, states, quadrants)


def api_settings(postgres, **overrides) -> Settings:
    # auth_disabled: the reads act as the test's tenant without keys (keys: test_access.py).
    values = {"tenant": f"t-{uuid.uuid4().hex[:10]}", "database_url": postgres.url(), "auth_disabled": True}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
async def dataset(postgres) -> Dataset:
    settings = api_settings(postgres)
    return await write_aggregates(settings, generate_events(random.Random(20261123)))


@asynccontextmanager
async def serve(settings: Settings, now: datetime | None = NOW):
    """The app in-process, its lifespan run, the clock pinned at `now` (None: the real clock)."""
    app = create_app(settings)
    if now is not None:
        app.dependency_overrides[get_now] = lambda: now
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            yield client


@pytest.fixture
async def api(dataset):
    async with serve(dataset.settings) as client:
        yield client


# --------------------------------------------------------------------------------------------
# Naive reference computations.


def window_start_s(window_s: float) -> float:
    return math.floor((NOW_S - window_s) / 60) * 60


def in_window(event: ScoredEvent, window_s: float) -> bool:
    return minute_of(event.occurred_s) >= window_start_s(window_s)


def expected_figures(events: list[ScoredEvent], promise: float) -> dict:
    bucket = StageBucket()
    for event in events:
        bucket.add(event)
    return stage_stats(bucket, promise).to_dict()


def assert_figures(row: dict, events: list[ScoredEvent], promise: float) -> None:
    """The row against stage_stats over the events, and against plain statistics of the events."""
    expected = expected_figures(events, promise)
    for name, value in expected.items():
        assert close(row[name], value), (name, row[name], value)
    assert row["events"] == len(events)
    assert row["promise"] == promise
    if not events:
        return
    gaps = [event.gap for event in events]
    assert close(row["mean_gap"], statistics.fmean(gaps))
    assert close(row["stddev_gap"], statistics.pstdev(gaps), 1e-7)
    assert close(row["mean_experience"], statistics.fmean(event.experience for event in events))
    assert close(row["mean_expectation"], statistics.fmean(event.expectation for event in events))
    assert close(row["shortfall_rate"], sum(gap < 0 for gap in gaps) / len(gaps))
    assert close(row["promise_kept_rate"], sum(event.experience >= promise for event in events) / len(events))
    negative = sum(event.emotion in NEGATIVE_EMOTIONS for event in events)
    assert close(row["negative_emotion_rate"], negative / len(events))
    assert close(row["revenue"], sum(event.revenue for event in events))
    # Percentiles come from 0.5-wide bins: within one bin of the exact order statistic.
    ordered = sorted(gaps)
    for name, quantile in (("gap_p10", 0.1), ("gap_p50", 0.5), ("gap_p90", 0.9)):
        rank = max(0, math.ceil(quantile * len(ordered)) - 1)
        assert abs(row[name] - ordered[rank]) <= 0.5 + 1e-9, (name, row[name], ordered[rank])


def revenue_now(dataset: Dataset, customer_id: str, now_s: float = NOW_S) -> float:
    """Straight from the events: each revenue decayed from its own time to max(now, latest event)."""
    mine = [event for event in dataset.events if event.customer_id == customer_id]
    valued_at = max(now_s, max(event.occurred_s for event in mine))
    half_life = dataset.settings.revenue_half_life_s
    return sum(event.revenue * 2 ** ((event.occurred_s - valued_at) / half_life) for event in mine)


def latest_journey(dataset: Dataset, customer_id: str) -> str:
    mine = [event for event in dataset.events if event.customer_id == customer_id]
    return max(mine, key=lambda event: (event.occurred_s, event.event_id)).journey


def assert_error(response: httpx.Response, status: int, field: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert [error["field"] for error in body["detail"]] == [field], body
    return body["detail"][0]


# --------------------------------------------------------------------------------------------
# Journeys and stage figures.


async def test_journey_maps_are_served_and_unknown_journeys_are_404(api):
    listed = (await api.get("/v1/journeys")).json()["items"]
    assert listed == [journey.to_dict() for journey in JOURNEYS.values()]
    assert (await api.get("/v1/journeys/hotel")).json() == JOURNEYS["hotel"].to_dict()

    error = assert_error(await api.get("/v1/journeys/hotle"), 404, "journey")
    assert "unknown journey 'hotle'" in error["message"] and "car-rental" in error["message"]
    assert error["allowed"] == list(JOURNEYS)
    error = assert_error(await api.get("/v1/journeys/hotel/stages/lobby/touchpoints"), 404, "stage")
    assert error["allowed"] == JOURNEYS["hotel"].stage_ids
    assert_error(await api.get("/v1/journeys/nope/stages/x/series"), 404, "journey")


@pytest.mark.parametrize("window, window_s", [("5m", 5 * MINUTE), ("1h", HOUR), ("90m", 90 * MINUTE),
                                              ("24h", DAY), ("7d", 7 * DAY), ("30d", 30 * DAY)])  # fmt: skip
async def test_stage_figures_over_a_window_match_the_events_in_it(api, dataset, window, window_s):
    for journey in (JOURNEYS["car-rental"], JOURNEYS["hotel"]):
        response = await api.get(f"/v1/journeys/{journey.id}/stages", params={"window": window})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["journey"] == journey.id and body["window"] == window
        assert datetime.fromisoformat(body["from"]).timestamp() == window_start_s(window_s)
        assert datetime.fromisoformat(body["to"]) == NOW
        assert [row["stage"] for row in body["stages"]] == journey.stage_ids
        for row in body["stages"]:
            key = (journey.id, row["stage"])
            events = [e for e in dataset.events if (e.journey, e.stage) == key and in_window(e, window_s)]
            assert_figures(row, events, journey.stage(row["stage"]).promise)
        # The last stage has no events at all: listed, with zero events and null figures.
        assert body["stages"][-1]["events"] == 0 and body["stages"][-1]["mean_gap"] is None


async def test_stages_window_defaults_to_one_hour(api, dataset):
    default = (await api.get("/v1/journeys/car-rental/stages")).json()
    explicit = (await api.get("/v1/journeys/car-rental/stages", params={"window": "1h"})).json()
    assert default["window"] == "1h" and default["stages"] == explicit["stages"]
    assert sum(row["events"] for row in default["stages"]) > 0


async def test_touchpoint_figures_are_split_by_touchpoint_and_channel(api, dataset):
    journey = JOURNEYS["car-rental"]
    stage = journey.stage("pickup")
    response = await api.get("/v1/journeys/car-rental/stages/pickup/touchpoints", params={"window": "7d"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["stage"] == "pickup" and body["window"] == "7d"
    events = [e for e in dataset.events if e.journey == journey.id and e.stage == "pickup" and in_window(e, 7 * DAY)]
    groups: dict[tuple[str, str], list[ScoredEvent]] = {}
    for event in events:
        groups.setdefault((event.touchpoint, event.channel), []).append(event)
    rows = {(row["touchpoint"] or "", row["channel"] or ""): row for row in body["touchpoints"]}
    # Every (touchpoint, channel) seen, plus the map's touchpoints that saw nothing.
    silent = {(touchpoint, "") for touchpoint in stage.touchpoints if not any(key[0] == touchpoint for key in groups)}
    assert set(rows) == set(groups) | silent
    assert len(rows) == len(body["touchpoints"])
    for key, row in rows.items():
        assert_figures(row, groups.get(key, []), stage.promise)
    # '' (not given) is null in the response, and comes last.
    assert any(row["touchpoint"] is None for row in body["touchpoints"])
    assert any(row["channel"] is None and row["events"] > 0 for row in body["touchpoints"])
    not_given = [row["touchpoint"] is None for row in body["touchpoints"]]
    assert not_given == sorted(not_given)
    assert "" not in [row["touchpoint"] for row in body["touchpoints"]]
    assert sum(row["events"] for row in body["touchpoints"]) == len(events)


async def test_series_steps_partition_the_window(api, dataset):
    journey, stage = JOURNEYS["hotel"], JOURNEYS["hotel"].stages[0]
    response = await api.get(f"/v1/journeys/hotel/stages/{stage.id}/series", params={"window": "24h", "step": "1h"})
    assert response.status_code == 200, response.text
    body = response.json()
    start_s = window_start_s(DAY)
    events = [e for e in dataset.events if e.journey == journey.id and e.stage == stage.id and in_window(e, DAY)]
    by_step: dict[int, list[ScoredEvent]] = {}
    for event in events:
        by_step.setdefault(int((minute_of(event.occurred_s) - start_s) // HOUR), []).append(event)
    points = body["points"]
    assert body["step"] == "1h"
    # 24 whole hours from the window start, then the hour in progress (holding now and the future).
    assert len(points) == 25
    for index, point in enumerate(points):
        assert datetime.fromisoformat(point["from"]).timestamp() == start_s + index * HOUR
        assert datetime.fromisoformat(point["to"]).timestamp() == start_s + (index + 1) * HOUR
        assert_figures(point, by_step.get(index, []), stage.promise)
    assert sum(point["events"] for point in points) == len(events)
    stages = (await api.get("/v1/journeys/hotel/stages", params={"window": "24h"})).json()["stages"]
    assert stages[0]["events"] == len(events)


async def test_series_step_defaults_to_a_round_step_and_is_bounded(api):
    url = "/v1/journeys/hotel/stages/booking/series"
    default = (await api.get(url, params={"window": "7d"})).json()
    assert default["step"] == "6h" and len(default["points"]) == 29
    assert (await api.get(url, params={"window": "1h"})).json()["step"] == "1m"
    assert (await api.get(url, params={"window": "30d", "step": "44m"})).status_code == 200
    for window, step in (("30d", "43m"), ("30d", "30s"), ("1d", "2d"), ("1d", "1x"), ("1d", "0m")):
        error = assert_error(await api.get(url, params={"window": window, "step": step}), 422, "step")
        assert "allowed" in error["message"]


@pytest.mark.parametrize("window", ["2w", "31d", "721h", "0m", "1h30m", "", "-1h", "1H"])
async def test_a_window_outside_the_allowed_ones_is_422(api, window):
    for url in ("/v1/journeys/hotel/stages", "/v1/journeys/hotel/stages/booking/touchpoints",
                "/v1/journeys/hotel/stages/booking/series"):  # fmt: skip
        error = assert_error(await api.get(url, params={"window": window}), 422, "window")
        assert error["allowed"] == ["5m", "1h", "24h", "7d", "30d"]
        assert "up to 30d" in error["message"]
    assert (await api.get("/v1/journeys/hotel/stages", params={"window": "720h"})).status_code == 200


# --------------------------------------------------------------------------------------------
# Customers.


async def test_customer_view_has_scores_stages_and_revenue_valued_now(api, dataset):
    for customer_id in ("c-007", *ODD_CUSTOMERS):
        response = await api.get(f"/v1/customers/{quote(customer_id, safe='')}")
        assert response.status_code == 200, response.text
        body = response.json()
        state = dataset.states[customer_id]
        mine = [event for event in dataset.events if event.customer_id == customer_id]
        assert body["customer_id"] == customer_id
        assert close(body["revenue"], revenue_now(dataset, customer_id), 1e-9)
        assert close(body["revenue"], state.revenue_at(NOW_S, dataset.settings.revenue_half_life_s))
        assert body["revenue"] <= sum(event.revenue for event in mine) + 1e-9
        assert close(body["experience_index"], state.experience_index)
        assert close(body["trend"], state.trend)
        assert body["quadrant"] == dataset.quadrants[customer_id]
        assert body["event_count"] == len(mine)
        assert datetime.fromisoformat(body["last_event_at"]).timestamp() == max(e.occurred_s for e in mine)
        assert datetime.fromisoformat(body["first_event_at"]).timestamp() == min(e.occurred_s for e in mine)
        assert body["latest_journey"] == latest_journey(dataset, customer_id)
        assert body["open_alerts"] == []
        # One row per (journey, stage) the customer went through, in journey then stage order.
        order = {(j.id, s.id): (ji, si) for ji, j in enumerate(JOURNEYS.values()) for si, s in enumerate(j.stages)}
        keys = [(row["journey"], row["stage"]) for row in body["stages"]]
        assert keys == sorted({(e.journey, e.stage) for e in mine}, key=order.__getitem__)
        half_life = dataset.settings.customer_half_life_s
        for row in body["stages"]:
            at_stage = [e for e in mine if (e.journey, e.stage) == (row["journey"], row["stage"])]
            weights = [2 ** ((e.occurred_s - NOW_S) / half_life) for e in at_stage]
            decayed_mean = sum(w * e.gap for w, e in zip(weights, at_stage)) / sum(weights)
            assert close(row["gap"], decayed_mean, 1e-9)
            assert row["events"] == len(at_stage)
            assert datetime.fromisoformat(row["last_event_at"]).timestamp() == max(e.occurred_s for e in at_stage)


async def test_revenue_of_a_customer_decays_with_query_time(dataset):
    state = dataset.states["c-001"]
    later = NOW + timedelta(days=90)
    async with serve(dataset.settings, now=later) as client:
        body = (await client.get("/v1/customers/c-001")).json()
    assert close(body["revenue"], revenue_now(dataset, "c-001", later.timestamp()))
    # 90 days is one revenue half-life (up to the few minutes a future event adds).
    assert close(body["revenue"], state.revenue_at(NOW_S, dataset.settings.revenue_half_life_s) / 2, 1e-4)


async def test_a_customer_never_seen_is_404_naming_the_customer(api):
    error = assert_error(await api.get("/v1/customers/nobody"), 404, "customer_id")
    assert error["message"] == "customer 'nobody' has never been seen"


def expected_order(dataset: Dataset, order: str, ids: list[str]) -> list[str]:
    field = order.lstrip("-")
    if field == "revenue":
        # Descending: most revenue first, ties by customer id; ascending is the exact reverse.
        descending = sorted(ids, key=lambda cid: (-revenue_now(dataset, cid), cid))
        return descending if order.startswith("-") else descending[::-1]
    key = {
        "experience_index": lambda cid: dataset.states[cid].experience_index,
        "last_event_at": lambda cid: round(dataset.states[cid].ref_s, 6),
    }[field]
    ascending = sorted(ids, key=lambda cid: (key(cid), cid))
    return ascending[::-1] if order.startswith("-") else ascending


async def read_all_pages(api, params: dict) -> list[dict]:
    items, cursor, pages = [], None, 0
    while True:
        response = await api.get("/v1/customers", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) <= params["limit"]
        items += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items
        assert len(body["items"]) == params["limit"] and pages < 1000


@pytest.mark.parametrize("order", ["-revenue", "revenue", "experience_index", "-experience_index",
                                   "last_event_at", "-last_event_at"])  # fmt: skip
async def test_customer_pages_cover_every_customer_once_in_order(api, dataset, order):
    everyone = list(dataset.states)
    for filters in ({}, {"quadrant": "at_risk"}, {"journey": "hotel"}, {"quadrant": "growth", "journey": "car-rental"}):
        ids = [
            cid for cid in everyone
            if dataset.quadrants[cid] == filters.get("quadrant", dataset.quadrants[cid])
            and latest_journey(dataset, cid) == filters.get("journey", latest_journey(dataset, cid))
        ]  # fmt: skip
        assert ids, filters
        items = await read_all_pages(api, {"order": order, "limit": 7, **filters})
        listed = [item["customer_id"] for item in items]
        assert len(listed) == len(set(listed))  # no duplicates
        assert listed == expected_order(dataset, order, ids)  # no gaps, in order
    by_id = {item["customer_id"]: item for item in await read_all_pages(api, {"order": order, "limit": 500})}
    for cid in ("c-010", "tie-3"):
        item, state = by_id[cid], dataset.states[cid]
        assert set(item) == {"customer_id", "experience_index", "revenue", "quadrant", "trend", "event_count",
                             "last_event_at", "latest_journey"}  # fmt: skip
        assert close(item["revenue"], revenue_now(dataset, cid))
        assert close(item["experience_index"], state.experience_index)
        assert item["event_count"] == state.events and item["quadrant"] == dataset.quadrants[cid]


async def test_customer_list_defaults_to_most_revenue_first_fifty(api, dataset):
    body = (await api.get("/v1/customers")).json()
    expected = expected_order(dataset, "-revenue", list(dataset.states))
    assert [item["customer_id"] for item in body["items"]] == expected[:50]
    assert body["next_cursor"] is not None


async def test_customer_list_rejects_bad_parameters_naming_them(api):
    error = assert_error(await api.get("/v1/customers", params={"quadrant": "at-risk"}), 422, "quadrant")
    assert error["allowed"] == list(QUADRANTS)
    error = assert_error(await api.get("/v1/customers", params={"order": "revenue desc"}), 422, "order")
    assert "-revenue" in error["allowed"] and "last_event_at" in error["message"]
    for limit in (0, 501, -3):
        error = assert_error(await api.get("/v1/customers", params={"limit": limit}), 422, "limit")
        assert error["allowed"] == "1-500"
    assert_error(await api.get("/v1/customers", params={"limit": "many"}), 422, "limit")
    for cursor in ("garbage!", "eyJ9", "bm90IGpzb24", "W10"):
        assert_error(await api.get("/v1/customers", params={"cursor": cursor}), 422, "cursor")
    issued = (await api.get("/v1/customers", params={"order": "experience_index", "limit": 2})).json()["next_cursor"]
    error = assert_error(await api.get("/v1/customers", params={"cursor": issued}), 422, "cursor")
    assert "order=experience_index" in error["message"]
    error = assert_error(await api.get("/v1/customers", params={"journey": "hotle"}), 422, "journey")
    assert error["allowed"] == list(JOURNEYS)


# --------------------------------------------------------------------------------------------
# Positioning map.


@pytest.mark.parametrize("journey", [None, "car-rental"])
async def test_positioning_map_counts_customers_and_revenue_per_quadrant(api, dataset, journey):
    response = await api.get("/v1/positioning-map", params={"journey": journey} if journey else {})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["journey"] == journey and datetime.fromisoformat(body["as_of"]) == NOW
    shown = [JOURNEYS[journey]] if journey else list(JOURNEYS.values())
    assert body["thresholds"] == {
        j.id: {"experience": j.experience_threshold, "revenue": j.revenue_threshold} for j in shown
    }
    assert [row["quadrant"] for row in body["quadrants"]] == list(QUADRANTS)
    ids = [cid for cid in dataset.states if journey is None or latest_journey(dataset, cid) == journey]
    for row in body["quadrants"]:
        members = [cid for cid in ids if dataset.quadrants[cid] == row["quadrant"]]
        assert members, row
        revenue = sum(revenue_now(dataset, cid) for cid in members)
        assert row["customers"] == len(members)
        assert close(row["revenue"], revenue)
        assert close(row["mean_revenue"], revenue / len(members))
        mean_index = statistics.fmean(dataset.states[cid].experience_index for cid in members)
        assert close(row["mean_experience_index"], mean_index)


async def test_positioning_map_lists_empty_quadrants_with_zeros(postgres):
    stage = JOURNEYS["car-rental"].stages[0]
    settings = api_settings(postgres)
    # One customer, high revenue and a good experience: only `exemplary` has anyone.
    await write_aggregates(settings, [ScoredEvent("e-1", "solo", "car-rental", stage.id, "web", "web", NOW_S - 60,
                                                  9.0, 8.0, stage.promise, stage.weight, revenue=5000.0)])  # fmt: skip
    async with serve(settings) as client:
        body = (await client.get("/v1/positioning-map")).json()
        svg = (await client.get("/v1/positioning-map.svg")).text
    rows = {row["quadrant"]: row for row in body["quadrants"]}
    assert rows["exemplary"]["customers"] == 1
    assert close(rows["exemplary"]["revenue"], 5000.0 * 2 ** (-60 / settings.revenue_half_life_s))
    for name in ("growth", "at_risk", "disengaged"):
        assert rows[name] == {"quadrant": name, "customers": 0, "revenue": 0.0, "mean_experience_index": None,
                              "mean_revenue": None}  # fmt: skip
    assert len(ElementTree.fromstring(svg).findall(".//{http://www.w3.org/2000/svg}circle")) == 1


async def test_positioning_map_svg_draws_one_bubble_per_quadrant_sized_by_revenue(api, dataset):
    response = await api.get("/v1/positioning-map.svg", params={"journey": "car-rental"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    root = ElementTree.fromstring(response.content)
    namespace = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{namespace}svg"
    positioning = (await api.get("/v1/positioning-map", params={"journey": "car-rental"})).json()
    figures = {row["quadrant"]: row for row in positioning["quadrants"]}
    circles = root.findall(f"{namespace}circle")
    assert len(circles) == 4
    # Area proportional to revenue: r^2 / revenue is the same for every bubble (up to rounding of r).
    radii = {circle.find(f"{namespace}title").text.split(":")[0]: float(circle.get("r")) for circle in circles}
    titles = {"Exemplary": "exemplary", "Growth": "growth", "At risk": "at_risk", "Disengaged": "disengaged"}
    ratios = [radii[title] ** 2 / figures[name]["revenue"] for title, name in titles.items()]
    assert max(ratios) / min(ratios) < 1.02
    texts = [element.text for element in root.iter(f"{namespace}text")]
    for label in ("Exemplary", "keep", "Growth", "cross-sell", "At risk", "improve urgently", "Disengaged"):
        assert label in texts
    for row in figures.values():
        assert f"{row['customers']:,} customers" in texts
        assert f"USD {row['revenue']:,.0f}" in texts
    assert any("Car rental" in text for text in texts)


async def test_positioning_map_svg_escapes_journey_names(postgres, tmp_path: Path):
    document = yaml.safe_load((DEFAULT_JOURNEYS_DIR / "hotel.yaml").read_text())
    document["name"] = 'Rooms & <Suites> "deluxe"'
    (tmp_path / "hotel.yaml").write_text(yaml.safe_dump(document))
    async with serve(api_settings(postgres, journeys_dir=tmp_path)) as client:
        response = await client.get("/v1/positioning-map.svg", params={"journey": "hotel"})
        assert response.status_code == 200
        assert_error(await client.get("/v1/positioning-map.svg", params={"journey": "car-rental"}), 422, "journey")
    root = ElementTree.fromstring(response.content)
    assert root.find("{http://www.w3.org/2000/svg}title").text == 'Positioning map: Rooms & <Suites> "deluxe"'


# --------------------------------------------------------------------------------------------
# Tenancy, health, metrics, documentation.


async def test_reads_are_scoped_to_the_tenant(postgres, dataset):
    async with serve(api_settings(postgres)) as other:
        assert_error(await other.get("/v1/customers/c-007"), 404, "customer_id")
        assert (await other.get("/v1/customers")).json() == {"items": [], "next_cursor": None}
        stages = (await other.get("/v1/journeys/hotel/stages", params={"window": "30d"})).json()["stages"]
        assert all(row["events"] == 0 for row in stages)
        quadrants = (await other.get("/v1/positioning-map")).json()["quadrants"]
        assert all(row["customers"] == 0 for row in quadrants)


async def test_health_readiness_metrics_and_docs(api):
    assert (await api.get("/healthz")).json() == {"status": "ok", "reason": None}
    assert (await api.get("/readyz")).json() == {"status": "ready", "reason": None}
    metrics = (await api.get("/metrics")).text
    assert 'cem_api_request_duration_seconds_count{method="GET",route="/healthz",status="200"}' in metrics
    assert (await api.get("/docs")).status_code == 200
    schema = (await api.get("/openapi.json")).json()
    for path in ("/v1/customers", "/v1/customers/{customer_id}", "/v1/journeys", "/v1/journeys/{journey}",
                 "/v1/journeys/{journey}/stages", "/v1/journeys/{journey}/stages/{stage}/touchpoints",
                 "/v1/journeys/{journey}/stages/{stage}/series", "/v1/positioning-map",
                 "/v1/positioning-map.svg", "/healthz", "/readyz"):  # fmt: skip
        operation = schema["paths"][path]["get"]
        assert operation["summary"], path
        assert "200" in operation["responses"], path
    series = schema["components"]["schemas"]["SeriesPoint"]["properties"]
    assert "from" in series and "to" in series


async def test_unreachable_database_is_503_with_retry_after(postgres):
    settings = api_settings(postgres, database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/cem")
    async with serve(settings) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        assert ready.json()["status"] == "unavailable" and "database" in ready.json()["reason"]
        response = await client.get("/v1/customers")
        assert_error(response, 503, "(database)")
        assert response.headers["retry-after"]
        assert_error(await client.get("/v1/positioning-map"), 503, "(database)")
        assert (await client.get("/healthz")).status_code == 200
        # A tenant's journey maps are stored in the database too: never read since the start, so
        # neither served nor used to judge a path (a tenant's own journey must not look unknown).
        assert_error(await client.get("/v1/journeys"), 503, "(database)")
        assert_error(await client.get("/v1/journeys/hotel/stages/lobby/series"), 503, "(database)")
        assert_error(await client.get("/v1/journeys/hotel/stages", params={"window": "2w"}), 503, "(database)")
        # Bad input is bad input whether or not the database is up: 4xx, never mixed with the 503.
        assert_error(await client.get("/v1/customers", params={"order": "best"}), 422, "order")
        assert_error(await client.get("/v1/customers", params={"limit": "many"}), 422, "limit")


async def test_windows_follow_the_real_clock_by_default(postgres):
    stage = JOURNEYS["hotel"].stages[1]
    settings = api_settings(postgres)
    now_s = datetime.now(timezone.utc).timestamp()
    events = [
        ScoredEvent(f"e-{index}", "c", "hotel", stage.id, "", "", now_s - age_s, 5.0, 7.0, stage.promise, stage.weight)
        for index, age_s in enumerate((120, 7200))
    ]
    await write_aggregates(settings, events)
    async with serve(settings, now=None) as client:
        body = (await client.get("/v1/journeys/hotel/stages", params={"window": "1h"})).json()
    assert body["stages"][1]["events"] == 1 and body["stages"][1]["mean_gap"] == -2.0
