"""The scoring consumer against a real broker and a real Postgres: exactly-once effect."""

from __future__ import annotations

import asyncio
import math
import random
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from services.core.db.engine import create_engine
from services.core.events import TouchpointRecord
from services.core.db.journeys import JourneyLoader
from services.core.journeys import load_journeys
from services.core.kafka import TOUCHPOINT_SCHEMA_HEADER, create_producer, ensure_topics, touchpoint_key
from services.core.scoring import HalfLives, bucket_events, merge_customer_events
from services.scoring.app import create_app as create_scoring
from services.scoring.consumer import Scorer, to_scored_event

from services.core.settings import DEFAULT_JOURNEYS_DIR
from tests.conftest import make_settings
from tests.e2e.test_pipeline import running, wait_until

pytestmark = pytest.mark.integration


def generate_records(tenant: str, count: int, seed: int, customers: int = 40) -> list[TouchpointRecord]:
    rng = random.Random(seed)
    journeys = load_journeys(DEFAULT_JOURNEYS_DIR)
    journey = journeys["car-rental"]
    now = datetime.now(timezone.utc)
    records = []
    for number in range(count):
        stage = rng.choice(journey.stages)
        experience = round(rng.uniform(0, 10), 2)
        records.append(
            TouchpointRecord(
                tenant=tenant,
                event_id=f"ev-{seed}-{number}",
                occurred_at=now - timedelta(seconds=rng.uniform(0, 3 * 86400)),
                received_at=now,
                customer_id=f"cust-{rng.randrange(customers)}",
                journey=journey.id,
                stage=stage.id,
                touchpoint=rng.choice([*stage.touchpoints, None]),
                channel=rng.choice(["app", "web", None]),
                experience=experience,
                expectation=stage.promise,
                promise=stage.promise,
                weight=stage.weight,
                emotion=rng.choice(["angry", "pleased", None]),
                revenue=rng.choice([0.0, 50.0, 700.0]),
            )
        )
    return records


async def produce(settings, records: list[TouchpointRecord]) -> None:
    producer = create_producer(settings)
    await producer.start()
    try:
        futures = [
            await producer.send(
                settings.touchpoints_topic,
                key=touchpoint_key(record.tenant, record.customer_id),
                value=record.to_json(),
                headers=[TOUCHPOINT_SCHEMA_HEADER],
            )
            for record in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def wait_for_processed(engine, tenant: str, expected: int, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with engine.connect() as conn:
            seen = await conn.scalar(text("SELECT count(*) FROM processed_events WHERE tenant = :t"), {"t": tenant})
        if seen >= expected:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {seen} of {expected} events scored after {timeout_s} s")
        await asyncio.sleep(0.1)


async def stage_totals(engine, tenant: str) -> dict:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT journey, stage, touchpoint, channel, minute, events, gap_sum, shortfall_events, "
                "promise_kept_events, negative_emotion_events, revenue_sum, gap_histogram "
                "FROM stage_buckets WHERE tenant = :t"
            ),
            {"t": tenant},
        )
        return {
            (r.journey, r.stage, r.touchpoint, r.channel, r.minute.timestamp()): (
                r.events, round(r.gap_sum, 6), r.shortfall_events, r.promise_kept_events,
                r.negative_emotion_events, round(r.revenue_sum, 6), list(r.gap_histogram),
            )  # fmt: skip
            for r in rows
        }


async def customer_rows(engine, tenant: str) -> dict:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT customer_id, events, experience_index, trend, revenue_sum, last_event_at, quadrant "
                 "FROM customers WHERE tenant = :t"),
            {"t": tenant},
        )  # fmt: skip
        return {r.customer_id: r for r in rows}


def expected_state(settings, records):
    events = [to_scored_event(record) for record in records]
    half_lives = HalfLives(settings.customer_half_life_s, settings.trend_half_life_s, settings.revenue_half_life_s)
    customers, _ = merge_customer_events(events, half_lives)
    buckets = {
        key: (
            bucket.events, round(bucket.gap_sum, 6), bucket.shortfall_events, bucket.promise_kept_events,
            bucket.negative_emotion_events, round(bucket.revenue_sum, 6), bucket.gap_histogram,
        )  # fmt: skip
        for key, bucket in bucket_events(events).items()
    }
    return buckets, customers


class RunningScorer:
    def __init__(self, settings, engine):
        self.scorer = Scorer(settings, engine, JourneyLoader.shipped(settings))
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        self.task = asyncio.create_task(self.scorer.run())
        return self.scorer

    async def __aexit__(self, *exc):
        self.scorer.stop()
        await asyncio.wait_for(self.task, 30)


def assert_customers_match(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for customer_id, state in expected.items():
        row = actual[customer_id]
        assert row.events == state.events
        assert math.isclose(row.experience_index, state.experience_index, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(row.trend, state.trend, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(row.revenue_sum, state.revenue_sum, rel_tol=1e-9, abs_tol=1e-9)
        assert row.last_event_at.timestamp() == pytest.approx(state.ref_s, abs=1e-6)


async def test_scored_aggregates_equal_the_pure_computation_and_duplicates_count_once(settings):
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 600, seed=1)
    duplicates = random.Random(2).sample(records, 150)
    try:
        async with RunningScorer(settings, engine):
            await produce(settings, records + duplicates)
            await wait_for_processed(engine, settings.tenant, len(records))
            await asyncio.sleep(0.5)  # let any redelivered duplicate batch land too
        buckets, customers = expected_state(settings, records)
        assert await stage_totals(engine, settings.tenant) == buckets
        assert_customers_match(await customer_rows(engine, settings.tenant), customers)
    finally:
        await engine.dispose()


async def test_out_of_order_delivery_gives_the_same_figures(postgres, kafka):
    records = generate_records("shared", 400, seed=3)
    in_order = make_settings(postgres, kafka)
    shuffled = make_settings(postgres, kafka)
    engine = create_engine(in_order.database_url)
    try:
        results = []
        for settings, batch in (
            (in_order, sorted(records, key=lambda r: r.occurred_at)),
            (shuffled, random.Random(4).sample(records, len(records))),
        ):
            await ensure_topics(settings)
            tenant_records = [record.model_copy(update={"tenant": settings.tenant}) for record in batch]
            async with RunningScorer(settings, engine):
                await produce(settings, tenant_records)
                await wait_for_processed(engine, settings.tenant, len(records))
            results.append((await stage_totals(engine, settings.tenant), await customer_rows(engine, settings.tenant)))
        (buckets_a, customers_a), (buckets_b, customers_b) = results
        assert buckets_a == buckets_b
        for customer_id, row in customers_a.items():
            other = customers_b[customer_id]
            assert row.events == other.events
            assert math.isclose(row.experience_index, other.experience_index, rel_tol=1e-9, abs_tol=1e-9)
            assert math.isclose(row.revenue_sum, other.revenue_sum, rel_tol=1e-9, abs_tol=1e-9)
            assert row.quadrant == other.quadrant
    finally:
        await engine.dispose()


async def test_a_process_with_several_consumers_splits_the_partitions_and_scores_each_event_once(postgres, kafka):
    settings = make_settings(postgres, kafka, scoring_consumers=3, topic_partitions=6)
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 900, seed=7, customers=60)
    duplicates = random.Random(8).sample(records, 200)
    app = create_scoring(settings)
    try:
        async with running(app) as client:
            scorers = app.state.scorers

            def owned() -> list[set[int]]:
                return [{tp.partition for tp in scorer.stored_offsets} for scorer in scorers]

            async def each_consumer_has_partitions():
                ready = await client.get("/readyz")
                return ready.status_code == 200 and all(owned()) and ready.json()["assigned_partitions"] == list(range(6))

            await wait_until(each_consumer_has_partitions)
            assert len(scorers) == 3
            assert sorted(partition for partitions in owned() for partition in partitions) == list(range(6))
            await produce(settings, records + duplicates)
            await wait_for_processed(engine, settings.tenant, len(records))
            await asyncio.sleep(0.5)  # let any redelivered duplicate batch land too
            assert all(scorer.batches > 0 for scorer in scorers), [scorer.batches for scorer in scorers]
        assert all(scorer.drained for scorer in scorers)
        buckets, customers = expected_state(settings, records)
        assert await stage_totals(engine, settings.tenant) == buckets
        assert_customers_match(await customer_rows(engine, settings.tenant), customers)
    finally:
        await engine.dispose()


async def test_restarted_consumer_resumes_from_stored_offsets_without_loss_or_double_counting(settings):
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 900, seed=5)
    try:
        async with RunningScorer(settings, engine):
            await produce(settings, records[:300])
            await wait_for_processed(engine, settings.tenant, 300)
        # Scorer stopped; more events arrive; a new instance must continue where the first stopped.
        await produce(settings, records[300:])
        async with RunningScorer(settings, engine) as scorer:
            await wait_for_processed(engine, settings.tenant, len(records))
            await asyncio.sleep(0.3)
            assert sum(offset or 0 for offset in scorer.stored_offsets.values()) == len(records)
        buckets, customers = expected_state(settings, records)
        assert await stage_totals(engine, settings.tenant) == buckets
        assert_customers_match(await customer_rows(engine, settings.tenant), customers)
        async with engine.connect() as conn:
            stored = await conn.scalar(
                text("SELECT sum(next_offset) FROM consumer_offsets WHERE group_id = :g"),
                {"g": settings.scoring_group_id},
            )
        assert stored == len(records)
    finally:
        await engine.dispose()
