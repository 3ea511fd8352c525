"""The decayed merge that score_batch does in SQL (services/scoring/store.py) equals the pure
maths it replaces (services.core.scoring: CustomerState.merge, CustomerStageState.merge,
quadrant()), on real Postgres: two batches, the second merged into what the first stored. Each
batch's outcome holds exactly the customers the alerts judge, with their merged states."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from services.core.alerting import HOT_GAP
from services.core.db.engine import create_engine
from services.core.journeys import JourneyCatalog, load_journeys
from services.core.scoring import HalfLives, ScoredEvent, merge_customer_events, quadrant, revenue_rank
from services.core.settings import Settings
from services.scoring.store import ScoringContext, TenantEvent, score_batch

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
HALF_LIVES = [HalfLives(90 * 86400.0, 7 * 86400.0, 90 * 86400.0), HalfLives(3600.0, 60.0, 600.0)]
JOURNEYS = load_journeys(Settings().journeys_dir)
# car-rental and hotel have their own thresholds; "retired" is not a journey of the tenant (the
# quadrant then stays what it was).
JOURNEY_IDS = ["car-rental", "hotel", "retired"]


SCORES = st.one_of(st.just(0.0), st.floats(1e-3, 10))


@st.composite
def events(draw, prefix: str) -> list[ScoredEvent]:
    count = draw(st.integers(1, 6))
    found = []
    for index in range(count):
        journey = draw(st.sampled_from(JOURNEY_IDS))
        # Microsecond times, as stored; up to 40 days back, a few minutes ahead.
        micros = draw(st.integers(-40 * 86400 * 10**6, 300 * 10**6))
        found.append(
            ScoredEvent(
                event_id=f"{prefix}-{draw(st.sampled_from('abc'))}{index}",
                customer_id=draw(st.sampled_from(["c1", "c2"])),
                journey=journey,
                stage=draw(st.sampled_from(["s1", "s2"])),
                touchpoint="",
                channel="",
                occurred_s=(NOW + timedelta(microseconds=micros)).timestamp(),
                # Scores and revenue as they come: Postgres raises an error where Python's float
                # products underflow (below 1e-308), which these never reach.
                experience=draw(SCORES),
                expectation=draw(SCORES),
                promise=8.0,
                weight=draw(st.sampled_from([0.5, 1.0, 3.0])),
                revenue=draw(st.one_of(st.just(0.0), st.floats(0.01, 1e6))),
            )
        )
    return found


def same(got: float, want: float) -> bool:
    return got == want or abs(got - want) < 1e-300


async def check(postgres, first: list[ScoredEvent], second: list[ScoredEvent], half_lives: HalfLives) -> None:
    tenant = f"merge-{uuid.uuid4().hex[:10]}"
    catalog = JourneyCatalog({key: JOURNEYS[key] for key in ("car-rental", "hotel")})
    context = ScoringContext(group_id="merge-test", half_lives=half_lives, journeys=catalog)
    engine = create_engine(postgres.url())
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            outcomes = []
            for events_ in (first, second):
                batch = [TenantEvent(tenant, item, NOW.timestamp()) for item in events_]
                outcomes.append(await score_batch(conn, batch, [], context, NOW))
            stored = {
                row.customer_id: row
                for row in await conn.execute(text("SELECT * FROM customers WHERE tenant = :t"), {"t": tenant})
            }
            stages = {
                (row.customer_id, row.journey, row.stage): row
                for row in await conn.execute(text("SELECT * FROM customer_stages WHERE tenant = :t"), {"t": tenant})
            }
            await transaction.rollback()
    finally:
        await engine.dispose()

    customers_1, stages_1 = merge_customer_events(first, half_lives)
    customers_2, stages_2 = merge_customer_events(second, half_lives)
    now_s = NOW.timestamp()

    def python_quadrant(state, previous: str | None) -> str:  # as the Python path computed it
        journey = catalog.of(tenant).get(state.latest_journey)
        if journey is None:
            return previous or "disengaged"
        revenue = state.revenue_at(now_s, half_lives.revenue_s)
        return quadrant(state.experience_index, revenue, journey.experience_threshold, journey.revenue_threshold)

    quadrants = {customer_id: python_quadrant(state, None) for customer_id, state in customers_1.items()}
    # What each batch stored for its customers, and the quadrant before it (None: a new customer).
    batches = [{customer_id: (state, None, quadrants[customer_id]) for customer_id, state in customers_1.items()}, {}]
    for customer_id, delta in customers_2.items():
        merged = customers_1[customer_id].merge(delta, half_lives) if customer_id in customers_1 else delta
        previous = quadrants.get(customer_id)
        quadrants[customer_id] = python_quadrant(merged, previous)
        batches[1][customer_id] = (merged, previous, quadrants[customer_id])
    for outcome, events_, expected in zip(outcomes, (first, second), batches):
        hot = {event.customer_id for event in events_ if event.gap <= HOT_GAP}
        judged = {
            customer_id
            for customer_id, (_, previous, current) in expected.items()
            if current == "at_risk" or previous != current or customer_id in hot
        }
        assert set(outcome.customers) == set(outcome.quadrants) == {(tenant, customer_id) for customer_id in judged}
        assert {(change.customer_id, change.previous, change.current) for change in outcome.quadrant_changes} == {
            (customer_id, previous, current)
            for customer_id, (_, previous, current) in expected.items()
            if previous != current
        }
        for customer_id in judged:
            state, _, current = expected[customer_id]
            got = outcome.customers[(tenant, customer_id)]
            assert outcome.quadrants[(tenant, customer_id)] == current
            assert (got.ref_s, got.first_event_s, got.events, got.latest_journey, got.latest_event_id) == (
                state.ref_s, state.first_event_s, state.events, state.latest_journey, state.latest_event_id,
            )  # fmt: skip
            for name in ("index_gap_sum", "index_weight_sum", "trend_gap_sum", "trend_weight_sum", "revenue_sum"):
                assert same(getattr(got, name), getattr(state, name)), name
    assert set(stored) == set(customers_1) | set(customers_2)
    for customer_id, row in stored.items():
        parts = [part[customer_id] for part in (customers_1, customers_2) if customer_id in part]
        want = parts[0] if len(parts) == 1 else parts[0].merge(parts[1], half_lives)
        assert row.last_event_at.timestamp() == want.ref_s
        assert row.first_event_at.timestamp() == want.first_event_s
        assert (row.latest_journey, row.latest_event_id, row.events) == (
            want.latest_journey, want.latest_event_id, want.events,
        )  # fmt: skip
        # The same float operations on the same operands: equal to the last bit (but for decay
        # factors below 2 ** -1022, 0 in SQL, subnormal in Python).
        for name in ("index_gap_sum", "index_weight_sum", "trend_gap_sum", "trend_weight_sum", "revenue_sum"):
            assert same(getattr(row, name), getattr(want, name)), name
        assert same(row.experience_index, want.experience_index)
        assert same(row.trend, want.trend)
        # ln(x) / ln(2) in SQL against math.log2: a few ulps of the rank.
        rank = revenue_rank(want.revenue_sum, want.ref_s, half_lives.revenue_s)
        assert math.isclose(row.revenue_rank, rank, rel_tol=1e-14), (row.revenue_rank, rank)
        assert row.quadrant == quadrants[customer_id]

    assert set(stages) == set(stages_1) | set(stages_2)
    for key, row in stages.items():
        parts = [part[key] for part in (stages_1, stages_2) if key in part]
        want = parts[0] if len(parts) == 1 else parts[0].merge(parts[1], half_lives.index_s)
        assert (row.last_event_at.timestamp(), row.events) == (want.ref_s, want.events)
        assert same(row.gap_sum, want.gap_sum) and same(row.weight_sum, want.weight_sum)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=events("one"), second=events("two"), half_lives=st.sampled_from(HALF_LIVES))
def test_sql_merge_equals_the_python_merge(postgres, first, second, half_lives):
    asyncio.run(check(postgres, first, second, half_lives))
