"""The positioning map (SPEC 1, 6): customers and revenue per quadrant, as JSON and as a picture."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from services.api.customers import Quadrant
from services.api.deps import (
    EngineDep, JourneysDep, NowDep, SettingsDep, TenantDep, autocommit_connection, journey_filter,
)  # fmt: skip
from services.api.errors import INVALID, UNAVAILABLE
from services.api.svg import Bubble, render_positioning_map
from services.core.access import requires
from services.core.auth import SCORES_READ
from services.core.db.quadrant_totals import quadrant_sums
from services.core.http import AUTH_RESPONSES

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
    """A dependency, so that the JSON and the SVG endpoints share the query and its parameters."""
    journey = journey_filter(journey, journeys)
    async with autocommit_connection(engine) as connection:
        sums = await quadrant_sums(connection, tenant, now, settings.revenue_half_life_s, journey)
    quadrants = [
        QuadrantFigures(
            quadrant=name,
            customers=figures.customers,
            revenue=figures.revenue,
            mean_experience_index=figures.index_sum / figures.customers if figures.customers else None,
            mean_revenue=figures.revenue / figures.customers if figures.customers else None,
        )
        for name, figures in sums.items()
    ]
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
