"""Customers, experience indexes and revenue per quadrant, from the totals the customers triggers keep.

Migrations 0007 and 0011 keep a few rows per tenant, journey, quadrant and revenue band, the
changes not folded yet included (`quadrant_totals_live`), so these sums cost the same at a
thousand customers and at a million. The positioning map and scoring's gauges read them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Double, cast, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.core.db.schema import customers, quadrant_totals_live
from services.core.revenue import band_revenue_at, future_overcount, index_sum
from services.core.scoring import QUADRANTS


@dataclass
class QuadrantSums:
    customers: int = 0
    index_sum: float = 0.0
    revenue: float = 0.0  # the customers' revenue valued at `now`


async def quadrant_sums(
    connection: AsyncConnection, tenant: str, now: datetime, half_life_s: float, journey: str | None = None
) -> dict[str, QuadrantSums]:
    """Every quadrant of `tenant` (only customers whose latest journey is `journey`, if given).

    A band values its customers' revenue decayed to `now`; the customers whose last event is after
    `now` (clock skew, a pinned `now`) count at full value instead, so their excess is taken back:
    an index range of the few such customers."""
    totals = quadrant_totals_live.c
    bands = select(
        totals.quadrant,
        totals.band,
        totals.customers,
        cast(totals.index_units, Double).label("index_units"),
        cast(totals.revenue_units, Double).label("revenue_units"),
    ).where(totals.tenant == tenant)
    ahead = select(customers.c.quadrant, customers.c.revenue_sum, customers.c.last_event_at).where(
        customers.c.tenant == tenant, customers.c.last_event_at > now
    )
    if journey is not None:
        bands = bands.where(totals.latest_journey == journey)
        ahead = ahead.where(customers.c.latest_journey == journey)
    band_rows = (await connection.execute(bands)).all()
    ahead_rows = (await connection.execute(ahead)).all()

    now_s = now.timestamp()
    sums = {name: QuadrantSums() for name in QUADRANTS}
    for row in band_rows:
        quadrant = sums[row.quadrant]
        quadrant.customers += row.customers
        quadrant.index_sum += index_sum(row.index_units)
        quadrant.revenue += band_revenue_at(row.revenue_units, row.band, now_s, half_life_s)
    for row in ahead_rows:
        sums[row.quadrant].revenue -= future_overcount(row.revenue_sum, row.last_event_at, now, half_life_s)
    for quadrant in sums.values():
        # No negative, zero-ish residue of the take-back, and none at all once a quadrant is empty.
        quadrant.revenue = max(quadrant.revenue, 0.0) if quadrant.customers else 0.0
    return sums
