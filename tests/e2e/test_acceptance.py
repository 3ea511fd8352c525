"""Acceptance, black-box: a client posts a few thousand generated events (valid, invalid,
duplicated, on several scales, out of order, JSON, NDJSON and single) and compares every figure
of SPEC 5 and 6 with its own computation, written here from the SPEC and sharing no code with
the service's maths."""

from __future__ import annotations

import asyncio
import math
import random
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from services.core.journeys import load_journeys
from tests.e2e.test_pipeline import stack, wait_ingest_ready, wait_until

pytestmark = pytest.mark.integration

DAY = 86400.0
NEGATIVE = {"annoyed", "frustrated", "angry"}
SCALES = [None, {"min": 1, "max": 5}, {"min": 0, "max": 100}]


def generate(journeys, seed: int, count: int):
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    customers = [f"cust-{n:03d}" for n in range(120)]
    # Revenue per customer from a few distinct magnitudes, so that orders and quadrants are clear-cut.
    spend = {customer: rng.choice([0.0, 37.0, 180.0, 950.0, 2600.0]) + rng.random() for customer in customers}
    events = []
    for number in range(count):
        journey = journeys[rng.choice(["car-rental", "hotel"])]
        stage = rng.choice(journey.stages)
        scale = rng.choice(SCALES)
        low, high = (0.0, 10.0) if scale is None else (scale["min"], scale["max"])
        customer = rng.choice(customers)
        age_s = rng.uniform(0, 50 * 60) if rng.random() < 0.8 else rng.uniform(2 * DAY, 20 * DAY)
        event = {
            "event_id": f"acc-{seed}-{number}",
            "occurred_at": (now - timedelta(seconds=age_s)).isoformat(),
            "customer_id": customer,
            "journey": journey.id,
            "stage": stage.id,
            "touchpoint": rng.choice(stage.touchpoints),
            "channel": rng.choice(["app", "web", "in_person"]),
            "source": "survey",
            "experience": round(rng.uniform(low, high), 2),
            "emotion": rng.choice(["delighted", "neutral", "annoyed", "angry", None]),
        }
        if scale is not None:
            event["scale"] = scale
        if rng.random() < 0.6:
            event["expectation"] = round(rng.uniform(low, high), 2)
        if rng.random() < 0.3:
            event["revenue"] = spend[customer]
        events.append({key: value for key, value in event.items() if value is not None})
    invalid = []
    for number, event in enumerate(rng.sample(events, 60)):
        broken = dict(event, event_id=f"bad-{seed}-{number}")
        field, value = rng.choice(
            [("stage", "pikcup"), ("experience", 11 if "scale" not in event else 1000), ("channel", "fax"),
             ("occurred_at", "yesterday"), ("revenue", -5), ("colour", "red"), ("journey", "spaceflight")]
        )  # fmt: skip
        broken[field] = value
        invalid.append((broken, field))
    return events, invalid


def to_ten(value, scale):
    scale = scale or {"min": 0, "max": 10}
    return (value - scale["min"]) / (scale["max"] - scale["min"]) * 10


def expected_figures(events, journeys, now_s):
    """SPEC 5 and 6 computed the plain way, from the list of unique accepted events."""
    rows = []
    for event in events:
        journey = journeys[event["journey"]]
        stage = journey.stage(event["stage"])
        experience = to_ten(event["experience"], event.get("scale"))
        expectation = to_ten(event["expectation"], event.get("scale")) if "expectation" in event else stage.promise
        rows.append(
            dict(event, experience10=experience, expectation10=expectation, gap=experience - expectation,
                 promise=stage.promise, weight=stage.weight,
                 t=datetime.fromisoformat(event["occurred_at"]).timestamp())
        )  # fmt: skip

    stages = defaultdict(list)
    for row in rows:
        stages[(row["journey"], row["stage"])].append(row)

    customers = {}
    by_customer = defaultdict(list)
    for row in rows:
        by_customer[row["customer_id"]].append(row)
    for customer, mine in by_customer.items():

        def index(half_life_days, mine=mine):
            weights = [2 ** ((row["t"] - now_s) / (half_life_days * DAY)) * row["weight"] for row in mine]
            return sum(w * row["gap"] for w, row in zip(weights, mine)) / sum(weights)

        latest = max(mine, key=lambda row: (row["t"], row["event_id"]))
        journey = journeys[latest["journey"]]
        revenue = sum(row.get("revenue", 0.0) * 2 ** ((row["t"] - now_s) / (90 * DAY)) for row in mine)
        experience_index = index(30)
        good = experience_index >= journey.experience_threshold
        high = revenue >= journey.revenue_threshold
        customers[customer] = {
            "experience_index": experience_index,
            "trend": index(7) - experience_index,
            "revenue": revenue,
            "events": len(mine),
            "quadrant": {(True, True): "exemplary", (True, False): "growth", (False, True): "at_risk",
                         (False, False): "disengaged"}[(good, high)],  # fmt: skip
            "near_boundary": abs(experience_index - journey.experience_threshold) < 1e-6
            or abs(revenue - journey.revenue_threshold) < 1e-3,
        }
    return stages, customers


def nearest_rank(values, quantile):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


@pytest.mark.timeout(240)
async def test_black_box_figures_match_an_independent_computation(settings):
    journeys = load_journeys(settings.journeys_dir)
    events, invalid = generate(journeys, seed=2026, count=2500)
    rng = random.Random(9)
    duplicates = rng.sample(events, 400)
    posted = events + duplicates
    rng.shuffle(posted)

    async with stack(settings) as (ingest, api, _):
        await wait_ingest_ready(ingest)
        # Invalid events one by one: each gets a 4xx naming its field.
        for event, field in invalid:
            response = await ingest.post("/v1/events", json=event)
            assert 400 <= response.status_code < 500, response.text
            assert field in [error["field"] for error in response.json()["detail"]], response.text
        # Valid ones in JSON batches, NDJSON batches and singles, shuffled, with duplicates.
        chunks = [posted[start : start + 450] for start in range(0, len(posted), 450)]
        for number, chunk in enumerate(chunks):
            if number % 3 == 0:
                response = await ingest.post("/v1/events:batch", json={"events": chunk})
            elif number % 3 == 1:
                body = b"\n".join(orjson.dumps(event) for event in chunk)
                response = await ingest.post(
                    "/v1/events:batch", content=body, headers={"content-type": "application/x-ndjson"}
                )
            else:
                for event in chunk[:40]:
                    assert (await ingest.post("/v1/events", json=event)).status_code == 202
                response = await ingest.post("/v1/events:batch", json={"events": chunk[40:]})
            assert response.status_code == 202, response.text
            assert response.json()["rejected"] == 0

        async def all_scored():
            total = 0
            for journey in ("car-rental", "hotel"):
                listing = (await api.get(f"/v1/journeys/{journey}/stages", params={"window": "30d"})).json()
                total += sum(row["events"] for row in listing["stages"])
            return total == len(events)

        await wait_until(all_scored, timeout_s=120)
        await asyncio.sleep(1.0)  # anything counted twice would land now
        now_s = datetime.now(timezone.utc).timestamp()
        stages, customers = expected_figures(events, journeys, now_s)

        # Stage figures over 30 days (every event) and over 1 h (the recent ones).
        for window, horizon_s in (("30d", 30 * DAY), ("1h", 3600 - 120)):
            for journey_id in ("car-rental", "hotel"):
                listing = (await api.get(f"/v1/journeys/{journey_id}/stages", params={"window": window})).json()
                assert [row["stage"] for row in listing["stages"]] == journeys[journey_id].stage_ids
                for row in listing["stages"]:
                    mine = [r for r in stages[(journey_id, row["stage"])] if now_s - r["t"] <= horizon_s]
                    if window == "1h":
                        # Minute buckets: an event 59-61 minutes old may fall either side.
                        assert abs(row["events"] - len(mine)) <= sum(
                            1 for r in stages[(journey_id, row["stage"])] if 3480 <= now_s - r["t"] <= 3720
                        )
                        continue
                    assert row["events"] == len(mine), (journey_id, row["stage"])
                    if not mine:
                        assert row["mean_gap"] is None
                        continue
                    gaps = [r["gap"] for r in mine]
                    n = len(mine)
                    mean_gap = sum(gaps) / n
                    assert row["mean_gap"] == pytest.approx(mean_gap, abs=1e-9)
                    assert row["mean_experience"] == pytest.approx(sum(r["experience10"] for r in mine) / n, abs=1e-9)
                    assert row["mean_expectation"] == pytest.approx(sum(r["expectation10"] for r in mine) / n, abs=1e-9)
                    assert row["stddev_gap"] == pytest.approx(
                        math.sqrt(sum((gap - mean_gap) ** 2 for gap in gaps) / n), abs=1e-6
                    )
                    assert row["shortfall_rate"] == pytest.approx(sum(gap < 0 for gap in gaps) / n)
                    assert row["promise_kept_rate"] == pytest.approx(
                        sum(r["experience10"] >= r["promise"] - 1e-12 for r in mine) / n, abs=1.5 / n
                    )
                    assert row["negative_emotion_rate"] == pytest.approx(
                        sum(r.get("emotion") in NEGATIVE for r in mine) / n
                    )
                    assert row["revenue"] == pytest.approx(sum(r.get("revenue", 0.0) for r in mine), rel=1e-9)
                    for name, quantile in (("gap_p10", 0.1), ("gap_p50", 0.5), ("gap_p90", 0.9)):
                        # Estimated from 0.5-wide histogram bins (SPEC 5): within one bin of the exact value.
                        assert abs(row[name] - nearest_rank(gaps, quantile)) <= 0.5 + 1e-9, (name, row["stage"])

        # Every customer: index, trend, revenue, events, quadrant.
        for customer, want in customers.items():
            got = (await api.get(f"/v1/customers/{customer}")).json()
            assert got["event_count"] == want["events"]
            assert got["experience_index"] == pytest.approx(want["experience_index"], rel=1e-6, abs=1e-6)
            assert got["trend"] == pytest.approx(want["trend"], rel=1e-5, abs=1e-6)
            assert got["revenue"] == pytest.approx(want["revenue"], rel=1e-5, abs=1e-6)
            if not want["near_boundary"]:
                assert got["quadrant"] == want["quadrant"], customer

        # The at-risk list, by revenue, across pages.
        listed, cursor = [], None
        while True:
            params = {"quadrant": "at_risk", "order": "-revenue", "limit": 7}
            if cursor:
                params["cursor"] = cursor
            page = (await api.get("/v1/customers", params=params)).json()
            listed += [item["customer_id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        at_risk = sorted(
            (c for c, want in customers.items() if want["quadrant"] == "at_risk"),
            key=lambda c: -customers[c]["revenue"],
        )
        assert listed == at_risk
        assert at_risk, "the generated data should put some customers at risk"

        # The positioning map: counts and revenue per quadrant.
        body = (await api.get("/v1/positioning-map")).json()
        by_quadrant = {row["quadrant"]: row for row in body["quadrants"]}
        for quadrant in ("exemplary", "growth", "at_risk", "disengaged"):
            members = [want for want in customers.values() if want["quadrant"] == quadrant]
            assert by_quadrant[quadrant]["customers"] == len(members)
            assert by_quadrant[quadrant]["revenue"] == pytest.approx(sum(m["revenue"] for m in members), rel=1e-5)
