"""Revenue decays between events: a sweep moves high-revenue customers whose decayed revenue fell
below their journey's threshold to the low-revenue quadrant (exemplary -> growth, at_risk ->
disengaged) and lets the alert rules see the change (an at-risk alert then resolves by itself).

Revenue only ever falls without events, so no other move can happen between events. The test
"revenue valued now < threshold" is `revenue_rank < log2(threshold) + now / half_life`, which the
(tenant, quadrant, revenue_rank) index answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime, timezone

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.core.journeys import Journey
from services.core.scoring import quadrant
from services.scoring.consumer import AfterBatch
from services.scoring.store import (
    CUSTOMER_STATE_COLUMNS,
    BatchOutcome,
    QuadrantChange,
    ScoringContext,
    customer_state_from_row,
)

log = logging.getLogger("cem.scoring")


async def demote_decayed_customers(
    engine: AsyncEngine, context: ScoringContext, after_batch: AfterBatch | None, now: datetime | None = None
) -> int:
    """One sweep in one transaction; returns how many customers changed quadrant."""
    now = now or datetime.now(timezone.utc)
    now_s = now.timestamp()
    outcome = BatchOutcome(now=now)
    catalog = context.journeys
    own = catalog.tenants_with_own_maps
    # Thresholds differ by tenant once a tenant stores its own maps: each such tenant with its
    # maps, then all the other tenants with the shipped ones.
    scopes = [(catalog.of(tenant), "tenant = ANY(CAST(:tenants AS text[]))", [tenant]) for tenant in own]
    scopes.append((catalog.shipped, "tenant <> ALL(CAST(:tenants AS text[]))", own))
    async with engine.begin() as conn:
        for journeys, tenant_filter, tenants in scopes:
            for journey in journeys.values():
                if journey.revenue_threshold <= 0:
                    continue  # every revenue is high: nobody can fall below
                await _demote(conn, context, journey, tenant_filter, tenants, now_s, outcome)
        for change in outcome.quadrant_changes:
            await conn.execute(
                text(
                    "UPDATE customers SET quadrant = :quadrant, updated_at = now() "
                    "WHERE tenant = :tenant AND customer_id = :customer_id"
                ),
                {"quadrant": change.current, "tenant": change.tenant, "customer_id": change.customer_id},
            )
        if after_batch is not None and outcome.quadrant_changes:
            await after_batch(conn, outcome)
    return len(outcome.quadrant_changes)


async def _demote(
    conn: AsyncConnection,
    context: ScoringContext,
    journey: Journey,
    tenant_filter: str,
    tenants: list[str],
    now_s: float,
    outcome: BatchOutcome,
) -> None:
    """The customers of `tenants` whose latest journey is `journey` and whose revenue decayed below
    its threshold: their new quadrant, into `outcome`."""
    bound = math.log2(journey.revenue_threshold) + now_s / context.half_lives.revenue_s
    rows = await conn.execute(
        text(
            f"SELECT tenant, {CUSTOMER_STATE_COLUMNS} FROM customers "
            "WHERE quadrant IN ('exemplary', 'at_risk') AND latest_journey = :journey "
            f"AND revenue_rank < :bound AND {tenant_filter} ORDER BY tenant, customer_id FOR UPDATE"
        ),
        {"journey": journey.id, "bound": bound, "tenants": tenants},
    )
    for row in rows:
        state = customer_state_from_row(row)
        revenue = state.revenue_at(now_s, context.half_lives.revenue_s)
        index = state.experience_index
        current = quadrant(index, revenue, journey.experience_threshold, journey.revenue_threshold)
        key = (row.tenant, row.customer_id)
        outcome.customers[key] = state
        outcome.quadrants[key] = current
        if current != row.quadrant:
            outcome.quadrant_changes.append(
                QuadrantChange(row.tenant, row.customer_id, row.quadrant, current, index, revenue, journey.id)
            )


async def keep_quadrants_fresh(
    engine: AsyncEngine, context: ScoringContext, after_batch: AfterBatch | None, interval_s: float
) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            moved = await demote_decayed_customers(engine, context, after_batch)
            if moved:
                log.info("quadrant sweep: %d customers moved to a lower-revenue quadrant", moved)
        except Exception as error:  # the database may be down: the consumer reports it; retry later
            log.warning("quadrant sweep failed: %s", str(error)[:300])
