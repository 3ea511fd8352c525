"""Retention of processed_events (services/scoring/retention.py): expired rows go, in batches, by
one replica at a time; kept rows still make copies duplicates; the task outlives a Postgres outage."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from services.core.db.engine import create_engine
from services.core.journeys import JourneyCatalog, load_journeys
from services.core.scoring import HalfLives, ScoredEvent
from services.core.settings import DAY_S, Settings
from services.scoring import retention
from services.scoring.retention import dedup_retention_s, delete_expired_events, keep_dedup_ledger_trimmed
from services.scoring.store import ScoringContext, TenantEvent, score_batch

pytestmark = pytest.mark.integration


async def add_rows(engine, tenant: str, prefix: str, count: int, days_ago: float) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO processed_events (tenant, event_id, occurred_at, scored_at) "
                "SELECT :tenant, :prefix || i, now() - make_interval(secs => (CAST(:days AS float8) + 1) * 86400), "
                "now() - make_interval(secs => CAST(:days AS float8) * 86400) FROM generate_series(1, :count) i"
            ),
            {"tenant": tenant, "prefix": prefix, "count": count, "days": days_ago},
        )


async def ids(engine, tenant: str) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT event_id FROM processed_events WHERE tenant = :t"), {"t": tenant})
        return {row.event_id for row in rows}


def event(event_id: str, occurred: datetime) -> ScoredEvent:
    return ScoredEvent(
        event_id=event_id, customer_id="c-1", journey="car-rental", stage="pickup", touchpoint="", channel="",
        occurred_s=occurred.timestamp(), experience=7.0, expectation=8.0, promise=8.0, weight=1.0, revenue=10.0,
    )  # fmt: skip


async def test_expired_rows_go_newer_ones_stay_and_a_kept_event_is_still_a_duplicate(settings):
    settings = settings.model_copy(update={"dedup_retention_batch_rows": 7})
    retention_days = dedup_retention_s(settings) / DAY_S  # 30 + 7 days + 5 min skew + 2 min slack
    assert 37.004 < retention_days < 37.006
    engine = create_engine(settings.database_url)
    try:
        await add_rows(engine, settings.tenant, "old-", 30, retention_days + 0.01)
        await add_rows(engine, settings.tenant, "kept-", 5, retention_days - 0.01)
        await add_rows(engine, settings.tenant, "new-", 5, 0)
        run = await delete_expired_events(engine, settings)
        assert run is not None
        # Other tests share the database but write no expired rows: 30 rows, 7 a batch.
        assert run.deleted == 30 and run.batches == 5
        assert await ids(engine, settings.tenant) == {f"{p}{i}" for p in ("kept-", "new-") for i in range(1, 6)}
        # Nothing more to delete.
        assert (await delete_expired_events(engine, settings)).deleted == 0

        # A late copy of a kept event is still recognised.
        journeys = load_journeys(settings.journeys_dir)
        context = ScoringContext(
            group_id=settings.scoring_group_id,
            half_lives=HalfLives(settings.customer_half_life_s, settings.trend_half_life_s, settings.revenue_half_life_s),
            journeys=JourneyCatalog(journeys),
        )
        now = datetime.now(timezone.utc)
        copy = TenantEvent(settings.tenant, event("kept-3", now - timedelta(days=30)), now.timestamp())
        fresh = TenantEvent(settings.tenant, event("fresh-1", now - timedelta(days=1)), now.timestamp())
        async with engine.begin() as conn:
            outcome = await score_batch(conn, [copy, fresh], [], context, now)
        assert outcome.duplicates == 1
        assert [item.event.event_id for item in outcome.scored] == ["fresh-1"]
    finally:
        await engine.dispose()


async def retention_lock(conn, function: str) -> None:
    """pg_advisory_lock or pg_advisory_unlock of the retention's lock, on this session."""
    await conn.execute(text(f"SELECT {function}(:c, :k)"), {"c": retention.LOCK_CLASS, "k": retention.LOCK_KEY})
    await conn.commit()


async def test_one_replica_deletes_at_a_time(settings):
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as holder:
            # Another replica holds the lock: this one does nothing.
            await retention_lock(holder, "pg_advisory_lock")
            assert await delete_expired_events(engine, settings) is None
            await retention_lock(holder, "pg_advisory_unlock")
        # A run releases the lock when it ends: the next one (any replica) takes it.
        assert await delete_expired_events(engine, settings) is not None
        assert await delete_expired_events(engine, settings) is not None
    finally:
        await engine.dispose()


async def test_the_deletion_uses_the_scored_at_index(settings):
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("SET LOCAL enable_seqscan = off"))  # as on a big table
            plan = "\n".join(
                row[0]
                for row in await conn.execute(
                    text("EXPLAIN " + retention._DELETE_BATCH.text),
                    {"after": datetime(2026, 1, 1, tzinfo=timezone.utc), "retention_s": 3e6, "limit": 10},
                )
            )
        assert "processed_events_scored_at" in plan and "Tid Scan" in plan
    finally:
        await engine.dispose()


async def test_the_task_survives_postgres_being_briefly_unavailable(own_postgres):
    server = own_postgres
    settings = Settings(
        tenant=f"t-{uuid.uuid4().hex[:10]}", database_url=server.url(), dedup_retention_interval_s=0.2
    )
    engine = create_engine(settings.database_url)
    task = asyncio.create_task(keep_dedup_ledger_trimmed(engine, settings))
    try:
        await asyncio.sleep(0.5)  # a few runs with nothing to delete
        server.stop()
        await asyncio.sleep(1.0)  # runs fail: logged, retried
        assert not task.done()
        server.start()  # same port and data
        await add_rows(engine, settings.tenant, "old-", 20, 40)
        await add_rows(engine, settings.tenant, "new-", 3, 1)
        for _ in range(100):
            if await ids(engine, settings.tenant) == {"new-1", "new-2", "new-3"}:
                break
            await asyncio.sleep(0.1)
        assert await ids(engine, settings.tenant) == {"new-1", "new-2", "new-3"}
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.dispose()
