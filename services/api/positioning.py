"""The positioning map (SPEC 1, 6): customers and revenue per quadrant, as JSON and as a picture."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import Double, cast, select

from services.api.customers import Quadrant
from services.api.deps import (
    EngineDep, JourneysDep, NowDep, SettingsDep, TenantDep, autocommit_connection, journey_filter,
)  # fmt: skip
from services.api.errors import INVALID, UNAVAILABLE
from services.api.revenue import band_revenue_at, future_overcount, index_sum
from services.api.svg import Bubble, render_positioning_map
from services.core.access import requires
from services.core.auth import SCORES_READ
from services.core.db.schema import customers, quadrant_totals_live
from services.core.http import AUTH_RESPONSES
from services.core.scoring import QUADRANTS

router = APIRouter(tags=["positioning map"], dependencies=[requires(SCORES_READ)], responses=AUTH_RESPONSES)


class Thresholds(BaseModel):
    experience: float = Field(description="Experience index at or above: good experience")
    revenue: float = Field(description="Revenue at or above: high revenue")


class QuadrantFigures(BaseModel):
    quadrant: Quadrant
    customers: int
    revenue: float = Field(description="Sum of the customers' revenue valued at `as_of`")
    mean_experience_index: float | None = Field(description="null when the quadrant is empty")
    mean_revenue: float | None = Field(description="null when the quadrant is empty")


class PositioningMap(BaseModel):
    as_of: datetime
    journey: str | None = Field(description="Only customers whose latest event was in this journey; null: all")
    thresholds: dict[str, Thresholds] = Field(description="Per journey id: the thresholds that place its customers")
    quadrants: list[QuadrantFigures] = Field(description="Always the four quadrants, in a fixed order")


JourneyQuery = Annotated[
    str | None,
    Query(description="Only customers whose latest event was in this journey (whose thresholds placed them)"),
]


async def positioning_map(
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
    journeys: JourneysDep,
    now: NowDep,
    journey: JourneyQuery = None,
) -> PositioningMap:
    """A dependency, so that the JSON and the SVG endpoints share the query and its parameters.

    The totals per quadrant are kept by triggers on customers (migrations 0007 and 0011): a few
    rows per journey and quadrant, one per revenue band, the changes not folded yet included. A
    band values its customers' revenue decayed to `now`; the customers whose last event is after
    `now` (clock skew, a pinned `now`) count at full value instead, so their excess is taken back:
    an index range of the few such customers."""
    journey = journey_filter(journey, journeys)
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
    async with autocommit_connection(engine) as connection:
        band_rows = (await connection.execute(bands)).all()
        ahead_rows = (await connection.execute(ahead)).all()

    half_life_s, now_s = settings.revenue_half_life_s, now.timestamp()
    counts = dict.fromkeys(QUADRANTS, 0)
    index_sums = dict.fromkeys(QUADRANTS, 0.0)
    revenues = dict.fromkeys(QUADRANTS, 0.0)
    for row in band_rows:
        counts[row.quadrant] += row.customers
        index_sums[row.quadrant] += index_sum(row.index_units)
        revenues[row.quadrant] += band_revenue_at(row.revenue_units, row.band, now_s, half_life_s)
    for row in ahead_rows:
        revenues[row.quadrant] -= future_overcount(row.revenue_sum, row.last_event_at, now, half_life_s)

    quadrants = []
    for name in QUADRANTS:
        count = counts[name]
        total = max(revenues[name], 0.0) if count else 0.0  # no negative zero-ish residue of the take-back
        quadrants.append(
            QuadrantFigures(
                quadrant=name,
                customers=count,
                revenue=total,
                mean_experience_index=index_sums[name] / count if count else None,
                mean_revenue=total / count if count else None,
            )
        )
    shown = [journeys[journey]] if journey is not None else list(journeys.values())
    return PositioningMap(
        as_of=now,
        journey=journey,
        thresholds={
            item.id: Thresholds(experience=item.experience_threshold, revenue=item.revenue_threshold) for item in shown
        },
        quadrants=quadrants,
    )


@router.get(
    "/v1/positioning-map",
    summary="Customers and revenue per positioning-map quadrant",
    description="Customers placed by experience index (x) and revenue (y) against the thresholds of "
    "their latest journey: exemplary (keep), growth (cross-sell), at_risk (improve urgently), "
    "disengaged. Revenue is valued at `as_of`.",
    response_model=PositioningMap,
    responses={**INVALID, **UNAVAILABLE},
)
async def get_positioning_map(
    positioning: Annotated[PositioningMap, Depends(positioning_map)],
) -> PositioningMap:
    return positioning


@router.get(
    "/v1/positioning-map.svg",
    summary="The positioning map as an SVG picture",
    description="Four quadrants, experience standard on x and revenue on y; one bubble per quadrant, "
    "its area proportional to the quadrant's revenue, labelled with customers and revenue.",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}, "description": "An SVG image"}, **INVALID, **UNAVAILABLE},
)
async def get_positioning_map_svg(
    positioning: Annotated[PositioningMap, Depends(positioning_map)], journeys: JourneysDep
) -> Response:
    journey = journeys.get(positioning.journey) if positioning.journey else None
    title = f"Positioning map: {journey.name}" if journey else "Positioning map: all journeys"
    note = None
    if journey is not None:
        thresholds = positioning.thresholds[journey.id]
        note = f"thresholds: experience index {thresholds.experience:g}, revenue {thresholds.revenue:,.0f}"
    picture = render_positioning_map(
        [Bubble(item.quadrant, item.customers, item.revenue) for item in positioning.quadrants],
        title=title,
        as_of=positioning.as_of,
        currency=journey.currency if journey else None,
        note=note,
    )
    return Response(picture, media_type="image/svg+xml")
