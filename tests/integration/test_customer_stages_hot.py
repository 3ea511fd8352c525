"""Scoring's updates of customer_stages stay HOT (no new index entry) when a batch touches a few
rows per page, as it does with many customers: migration 0010 leaves room on every page."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from services.core.db.engine import create_engine
from services.core.journeys import JourneyCatalog, load_journeys
from services.core.scoring import HalfLives, ScoredEvent
from services.core.settings import Settings
from services.scoring.store import ScoringContext, TenantEvent, score_batch

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
CUSTOMERS = 2_000  # ~30 heap pages of customer_stages rows
EVERY = 25  # the second batch updates one row in 25: a few per page, as at a million customers


def _event(tenant: str, customer: int, seconds: float) -> TenantEvent:
    event = ScoredEvent(
        event_id=f"e{customer}-{seconds}", customer_id=f"c{customer}", journey="hotel", stage="booking",
        touchpoint="", channel="", occurred_s=NOW.timestamp() + seconds, experience=7.0, expectation=8.0,
        promise=8.0, weight=1.0, revenue=10.0,
    )  # fmt: skip
    return TenantEvent(tenant, event, NOW.timestamp())


async def _hot_and_all_updates(postgres) -> tuple[int, int, str]:
    tenant = f"hot-{uuid.uuid4().hex[:10]}"
    context = ScoringContext("hot-test", HalfLives(90 * 86400.0, 7 * 86400.0, 90 * 86400.0), JourneyCatalog(
        {"hotel": load_journeys(Settings().journeys_dir)["hotel"]}
    ))  # fmt: skip
    engine = create_engine(postgres.url())
    try:
        async with engine.begin() as conn:  # the rows, committed: pages as inserts fill them
            await score_batch(conn, [_event(tenant, n, 0) for n in range(CUSTOMERS)], [], context, NOW)
        async with engine.connect() as conn:
            transaction = await conn.begin()
            later = [_event(tenant, n, 60) for n in range(0, CUSTOMERS, EVERY)]
            await score_batch(conn, later, [], context, NOW)
            # This transaction's own counts: exact, not the cumulative statistics reported later.
            row = (
                await conn.execute(
                    text(
                        "SELECT pg_stat_get_xact_tuples_hot_updated(c.oid) AS hot, "
                        "pg_stat_get_xact_tuples_updated(c.oid) AS updated, "
                        "array_to_string(c.reloptions, ',') AS options "
                        "FROM pg_class c WHERE c.relname = 'customer_stages'"
                    )
                )
            ).one()
            await transaction.rollback()
    finally:
        await engine.dispose()
    return row.hot, row.updated, row.options


def test_sparse_customer_stage_updates_are_hot(postgres):
    hot, updated, options = asyncio.run(_hot_and_all_updates(postgres))
    assert "fillfactor=90" in options
    assert updated == CUSTOMERS // EVERY
    assert hot == updated
