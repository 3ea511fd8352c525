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
from sqlalchemy.ext.asyncio import AsyncEngine

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
    async with engine.begin() as conn:
        for journey in context.journeys.shipped.values():
            if journey.revenue_threshold <= 0:
                continue  # every revenue is high: nobody can fall below
            bound = math.log2(journey.revenue_threshold) + now_s / context.half_lives.revenue_s
            rows = await conn.execute(
                text(
                    f"SELECT tenant, {CUSTOMER_STATE_COLUMNS} FROM customers "
                    "WHERE quadrant IN ('exemplary', 'at_risk') AND latest_journey = :journey "
                    "AND revenue_rank < :bound ORDER BY tenant, customer_id FOR UPDATE"
                ),
                {"journey": journey.id, "bound": bound},
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
