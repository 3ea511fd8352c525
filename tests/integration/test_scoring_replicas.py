"""Two scoring replicas of one tenant score batches at the same time: different customers (the
record key is the customer, so each replica owns its own), the same minute buckets. The rows the
replicas share are written last in a batch's transaction, so the second replica claims its events
and merges its customer stages while the first one's transaction is still open, and waits only
where the rows are shared. Both then commit, without a deadlock, and every sum counts both."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from services.core.db.engine import create_engine
from services.core.journeys import JourneyCatalog, load_journeys
from services.core.scoring import HalfLives, ScoredEvent, bucket_events
from services.core.settings import Settings
from services.scoring.store import BUCKETS_LOCK_CLASS, ScoringContext, TenantEvent, score_batch

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
HALF_LIVES = HalfLives(3600.0, 60.0, 600.0)


def scored(
    replica: str, number: int, occurred: datetime, experience: float = 7.0, revenue: float = 10.0
) -> ScoredEvent:
    """An event of customer `number` of `replica`, at the one stage, touchpoint and channel."""
    return ScoredEvent(
        event_id=f"{replica}-e{number}", customer_id=f"{replica}-c{number}", journey="hotel", stage="check-in",
        touchpoint="front-desk", channel="in_person", occurred_s=occurred.timestamp(), experience=experience,
        expectation=6.0, promise=8.0, weight=1.0, revenue=revenue,
    )  # fmt: skip


def events(replica: str, customers: int) -> list[ScoredEvent]:
    return [
        scored(replica, number, NOW - timedelta(minutes=number % 2), float(number % 10), 100.0 + number)
        for number in range(customers)
    ]


async def wait_for_lock(conn, pid: int, timeout_s: float = 10.0) -> str:
    """The wait event of backend `pid` once it waits for a lock."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = (
            await conn.execute(
                text("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            )
        ).one()
        if row.wait_event_type == "Lock":
            return row.wait_event
        await asyncio.sleep(0.02)
    raise AssertionError(f"backend {pid} never waited for a lock")


async def tables_written(conn, pid: int) -> set[str]:
    """The tables backend `pid` has written in its open transaction (the statement text in
    pg_stat_activity is not reliable for asyncpg's prepared statements)."""
    rows = await conn.execute(
        text(
            "SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE l.pid = :pid AND l.granted AND l.mode = 'RowExclusiveLock' AND c.relkind = 'r'"
        ),
        {"pid": pid},
    )
    return {row.relname for row in rows}


async def test_a_second_replica_waits_only_at_the_shared_rows_and_both_commit(postgres):
    tenant = f"replicas-{uuid.uuid4().hex[:10]}"
    journeys = load_journeys(Settings().journeys_dir)
    context = ScoringContext("replicas-test", HALF_LIVES, JourneyCatalog({"hotel": journeys["hotel"]}))
    first, second = events("a", 40), events("b", 30)
    engine = create_engine(postgres.url(), pool_size=3)
    try:
        async with engine.connect() as one, engine.connect() as two, engine.connect() as observer:
            first_transaction = await one.begin()
            await score_batch(one, [TenantEvent(tenant, item, NOW.timestamp()) for item in first], [], context, NOW)

            second_transaction = await two.begin()
            second_pid = (await two.get_raw_connection()).driver_connection.get_server_pid()
            scoring = asyncio.create_task(
                score_batch(two, [TenantEvent(tenant, item, NOW.timestamp()) for item in second], [], context, NOW)
            )
            try:
                wait_event = await wait_for_lock(observer, second_pid)
                # Past its own rows (the ledger, its customer stages, its customers and their
                # quadrant deltas, which only append since migration 0011), it waits for the
                # tenant's bucket lock, which the first replica's open transaction holds. It left
                # the quadrant fold to the first, which holds it, and did not touch the totals.
                # Before 0011 it waited at the quadrant totals' lock, right after its customers;
                # before the shared rows came last, at the buckets right after its claim.
                assert wait_event == "advisory"
                waited_class = (
                    await observer.execute(
                        text("SELECT classid FROM pg_locks WHERE pid = :pid AND locktype = 'advisory' AND NOT granted"),
                        {"pid": second_pid},
                    )
                ).scalar_one()
                assert waited_class == BUCKETS_LOCK_CLASS
                written = await tables_written(observer, second_pid)
                assert {"processed_events", "customer_stages", "customers", "quadrant_total_deltas"} <= written
                assert not written & {"stage_buckets", "quadrant_totals"}, written
                assert not scoring.done()

                await first_transaction.commit()
                outcome = await asyncio.wait_for(scoring, 10)
                await second_transaction.commit()
            finally:
                if not scoring.done():  # a failed check: stop it before its connection closes
                    scoring.cancel()
                    await asyncio.gather(scoring, return_exceptions=True)

            buckets = (
                await observer.execute(
                    text("SELECT minute, events FROM stage_buckets WHERE tenant = :t ORDER BY minute"), {"t": tenant}
                )
            ).all()
            customers = (
                await observer.execute(
                    text("SELECT count(*) AS n, sum(events) AS events FROM customers WHERE tenant = :t"), {"t": tenant}
                )
            ).one()
            claimed = (
                await observer.execute(text("SELECT count(*) FROM processed_events WHERE tenant = :t"), {"t": tenant})
            ).scalar_one()
    finally:
        await engine.dispose()

    assert len(outcome.scored) == len(second)
    want = bucket_events(first + second)
    assert sorted((row.minute.timestamp(), row.events) for row in buckets) == sorted(
        (key[4], bucket.events) for key, bucket in want.items()
    )
    assert (customers.n, customers.events) == (70, 70)
    assert claimed == 70


async def test_batches_that_insert_and_update_buckets_of_two_days_in_opposite_ways_do_not_deadlock(postgres):
    """A bucket upsert fires two roll-up triggers, one for the rows it updated and one for those it
    inserted, each locking its hour and day rows in order, but not in one order together. Batch
    A updates a minute of day 2 and inserts one in day 1; batch B the other way round. A third
    transaction holds their hour rows until both wait for them: each then holds its first
    trigger's rows of one day and its second trigger wants the other's (without the tenant's
    bucket lock Postgres aborts one: `DeadlockDetectedError`). With the lock, B waits for A before
    it touches a shared row, and both commit."""
    tenant = f"rollups-{uuid.uuid4().hex[:10]}"
    journeys = load_journeys(Settings().journeys_dir)
    context = ScoringContext("replicas-test", HALF_LIVES, JourneyCatalog({"hotel": journeys["hotel"]}))
    midnight = NOW.replace(hour=0)
    hour_1, hour_2 = midnight - timedelta(minutes=30), midnight + timedelta(minutes=30)  # two days
    engine = create_engine(postgres.url(), pool_size=4)

    async def score(conn, batch: list[ScoredEvent]) -> None:
        async with conn.begin():
            await score_batch(conn, [TenantEvent(tenant, item, NOW.timestamp()) for item in batch], [], context, NOW)

    try:
        async with engine.connect() as setup:  # the minutes that the batches then update
            await score(setup, [scored("s", 0, hour_1), scored("s", 1, hour_2)])
        async with engine.connect() as one, engine.connect() as two, engine.connect() as holder, \
                engine.connect() as observer:  # fmt: skip
            pids = [(await conn.get_raw_connection()).driver_connection.get_server_pid() for conn in (one, two)]
            hours_held = await holder.begin()
            hold = text("UPDATE stage_buckets_hourly SET events = events WHERE tenant = :t")
            await holder.execute(hold, {"t": tenant})
            later = timedelta(minutes=5)  # a minute of that hour with no bucket yet
            batches = [
                asyncio.create_task(score(one, [scored("a", 0, hour_2), scored("a", 1, hour_1 + later)])),
                asyncio.create_task(score(two, [scored("b", 0, hour_1), scored("b", 1, hour_2 + later)])),
            ]
            try:
                for pid in pids:
                    await wait_for_lock(observer, pid)
                await hours_held.rollback()
                await asyncio.wait_for(asyncio.gather(*batches), 30)
            finally:
                for batch in batches:  # a failed check: stop them before their connections close
                    batch.cancel()
                await asyncio.gather(*batches, return_exceptions=True)
            days = (
                await observer.execute(
                    text("SELECT day, events FROM stage_buckets_daily WHERE tenant = :t ORDER BY day"), {"t": tenant}
                )
            ).all()
    finally:
        await engine.dispose()
    assert [(row.day, row.events) for row in days] == [(midnight - timedelta(days=1), 3), (midnight, 3)]
