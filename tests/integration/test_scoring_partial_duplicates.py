"""A batch that mixes new events with events already scored: score_batch computes the rows of
every event while Postgres claims them, as if all were new, and must compute them again for the
new ones only. The stored sums then count each event once."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from services.core.db.engine import create_engine
from services.core.journeys import JourneyCatalog, load_journeys
from services.core.scoring import HalfLives, ScoredEvent, bucket_events, merge_customer_events
from services.core.settings import Settings
from services.scoring.store import ScoringContext, TenantEvent, score_batch

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
HALF_LIVES = HalfLives(3600.0, 60.0, 600.0)


def event(number: int, customer: str, stage: str) -> ScoredEvent:
    return ScoredEvent(
        event_id=f"e{number}",
        customer_id=customer,
        journey="hotel",
        stage=stage,
        touchpoint="front-desk",
        channel="in_person",
        occurred_s=(NOW - timedelta(minutes=number % 3)).timestamp(),
        experience=float(number % 10),
        expectation=6.0,
        promise=8.0,
        weight=1.0,
        revenue=10.0 * number,
    )


async def test_events_seen_before_are_dropped_from_the_rows_computed_meanwhile(postgres):
    tenant = f"dup-{uuid.uuid4().hex[:10]}"
    journeys = load_journeys(Settings().journeys_dir)
    context = ScoringContext("dup-test", HALF_LIVES, JourneyCatalog({"hotel": journeys["hotel"]}))
    stages = ["check-in", "stay"]
    first = [event(n, f"c{n % 2}", stages[n % 2]) for n in range(4)]
    new = [event(n, f"c{n % 3}", stages[n % 2]) for n in range(4, 9)]
    # Two events of the first batch again, the new ones, and one new event twice in the batch.
    second = [first[1], *new, first[3], new[0]]
    engine = create_engine(postgres.url())
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            tenant_events = [TenantEvent(tenant, item, NOW.timestamp()) for item in first]
            await score_batch(conn, tenant_events, [], context, NOW)
            outcome = await score_batch(
                conn, [TenantEvent(tenant, item, NOW.timestamp()) for item in second], [], context, NOW
            )
            buckets = {
                (row.journey, row.stage, row.touchpoint, row.channel, row.minute.timestamp()): row
                for row in await conn.execute(text("SELECT * FROM stage_buckets WHERE tenant = :t"), {"t": tenant})
            }
            customers = {
                row.customer_id: row.events
                for row in await conn.execute(text("SELECT * FROM customers WHERE tenant = :t"), {"t": tenant})
            }
            customer_stages = {
                (row.customer_id, row.journey, row.stage): row.events
                for row in await conn.execute(text("SELECT * FROM customer_stages WHERE tenant = :t"), {"t": tenant})
            }
            await transaction.rollback()
    finally:
        await engine.dispose()

    assert [item.event.event_id for item in outcome.scored] == [item.event_id for item in new]
    assert outcome.duplicates == 3
    every_event = first + new
    want_buckets = bucket_events(every_event)
    assert set(buckets) == set(want_buckets)
    for key, bucket in want_buckets.items():
        row = buckets[key]
        assert (row.events, list(row.gap_histogram)) == (bucket.events, bucket.gap_histogram)
        assert row.revenue_sum == pytest.approx(bucket.revenue_sum)
    want_customers, want_stages = merge_customer_events(every_event, HALF_LIVES)
    assert customers == {customer_id: state.events for customer_id, state in want_customers.items()}
    assert customer_stages == {key: state.events for key, state in want_stages.items()}
