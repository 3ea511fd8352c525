"""Journey resources: the maps, and the live figures of their stages, touchpoints and series."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from services.api.buckets import sum_by_stage, sum_by_step, sum_by_touchpoint
from services.api.deps import EngineDep, JourneyDep, JourneysDep, NowDep, StageDep, TenantDep
from services.api.errors import INVALID, NOT_FOUND, UNAVAILABLE
from services.api.parameters import WINDOW_ALLOWED, format_duration, parse_step, parse_window
from services.core.access import requires
from services.core.auth import SCORES_READ
from services.core.bucket_windows import Window
from services.core.http import AUTH_RESPONSES
from services.core.journeys import Stage
from services.core.scoring import StageBucket, stage_stats

router = APIRouter(
    prefix="/v1/journeys", tags=["journeys"], dependencies=[requires(SCORES_READ)], responses=AUTH_RESPONSES
)


# --------------------------------------------------------------------------------------------
# Response models.


class StageAlertMap(BaseModel):
    mean_gap_below: float
    shortfall_rate_above: float
    min_events: int


class StageMap(BaseModel):
    id: str
    name: str
    description: str | None
    phase: str | None
    promise: float = Field(description="Default expectation (0-10) and the bar of the promise-kept rate")
    weight: float = Field(description="Share of the stage in a customer's experience index")
    touchpoints: list[str]
    alert: StageAlertMap


class JourneyMap(BaseModel):
    id: str
    name: str
    description: str | None
    currency: str | None
    revenue_threshold: float = Field(description="Positioning map: revenue at or above is high revenue")
    experience_threshold: float = Field(description="Positioning map: experience index at or above is good")
    stages: list[StageMap]


class JourneyList(BaseModel):
    items: list[JourneyMap]


class StageFigures(BaseModel):
    """The figures of a set of events (SPEC 6); null where there are no events to average."""

    events: int
    mean_expectation: float | None
    mean_experience: float | None
    mean_gap: float | None = Field(description="Mean of experience - expectation (0-10 scale); < 0 fell short")
    stddev_gap: float | None = Field(description="Population standard deviation of the gap")
    shortfall_rate: float | None = Field(description="Share of events with gap < 0")
    promise: float | None = Field(description="The stage's promise in the journey map")
    promise_kept_rate: float | None = Field(description="Share of events with experience >= promise")
    negative_emotion_rate: float | None = Field(description="Share of events that were annoyed, frustrated or angry")
    gap_p10: float | None = Field(description="10th percentile of the gap (from 0.5-wide histogram bins)")
    gap_p50: float | None
    gap_p90: float | None
    revenue: float = Field(description="Revenue of the events (not decayed)")


class StageRow(StageFigures):
    stage: str


class TouchpointRow(StageFigures):
    touchpoint: str | None = Field(description="null: events that named no touchpoint")
    channel: str | None = Field(description="null: events that named no channel")


class SeriesPoint(StageFigures):
    from_: datetime = Field(serialization_alias="from", description="Start of the step")
    to: datetime = Field(description="End of the step (the last step is still filling)")


class WindowedResponse(BaseModel):
    journey: str
    window: str
    from_: datetime = Field(serialization_alias="from", description="Start of the window (whole minute)")
    to: datetime = Field(description="Query time")


class StagesResponse(WindowedResponse):
    stages: list[StageRow]


class TouchpointsResponse(WindowedResponse):
    stage: str
    touchpoints: list[TouchpointRow]


class SeriesResponse(WindowedResponse):
    stage: str
    step: str
    points: list[SeriesPoint]


def _figures(bucket: StageBucket | None, stage: Stage) -> dict:
    return stage_stats(bucket or StageBucket(), stage.promise).to_dict()


WindowQuery = Annotated[str, Query(description=f"Window ending now: {WINDOW_ALLOWED}")]


# --------------------------------------------------------------------------------------------
# Routes.


@router.get("", summary="List the journey maps", response_model=JourneyList)
async def list_journeys(journeys: JourneysDep) -> JourneyList:
    return JourneyList(items=[JourneyMap(**journey.to_dict()) for journey in journeys.values()])


@router.get(
    "/{journey}",
    summary="Get one journey map",
    description="The stages in order, with their promise, weight, touchpoints and alert rule.",
    response_model=JourneyMap,
    responses=NOT_FOUND,
)
async def get_journey_map(journey: JourneyDep) -> JourneyMap:
    return JourneyMap(**journey.to_dict())


@router.get(
    "/{journey}/stages",
    summary="Figures of every stage over a window",
    description="One row per stage in journey order; stages without events in the window have "
    "`events: 0` and null figures. A window holds the minute buckets from `from` on.",
    response_model=StagesResponse,
    responses={**NOT_FOUND, **INVALID, **UNAVAILABLE},
)
async def journey_stages(
    journey: JourneyDep, engine: EngineDep, tenant: TenantDep, now: NowDep, window: WindowQuery = "1h"
) -> StagesResponse:
    window_span = Window.ending_at(now, parse_window(window))
    async with engine.connect() as connection:
        sums = await sum_by_stage(connection, tenant, journey.id, journey.stage_ids, window_span)
    return StagesResponse(
        journey=journey.id,
        window=window,
        from_=window_span.start,
        to=window_span.end,
        stages=[StageRow(stage=stage.id, **_figures(sums.get(stage.id), stage)) for stage in journey.stages],
    )


def _touchpoint_order(stage: Stage, key: tuple[str, str]) -> tuple:
    # The map's touchpoints in map order, then others by name; "not given" ('') last.
    touchpoint, channel = key
    mapped = stage.touchpoints.index(touchpoint) if touchpoint in stage.touchpoints else len(stage.touchpoints)
    return (touchpoint == "", mapped, touchpoint, channel == "", channel)


@router.get(
    "/{journey}/stages/{stage}/touchpoints",
    summary="Figures of a stage per touchpoint and channel over a window",
    description="One row per (touchpoint, channel) seen in the window; the map's touchpoints without "
    "events are listed with `events: 0` and `channel: null`. Touchpoint or channel null: not given.",
    response_model=TouchpointsResponse,
    responses={**NOT_FOUND, **INVALID, **UNAVAILABLE},
)
async def stage_touchpoints(
    journey: JourneyDep,
    stage: StageDep,
    engine: EngineDep,
    tenant: TenantDep,
    now: NowDep,
    window: WindowQuery = "24h",
) -> TouchpointsResponse:
    window_span = Window.ending_at(now, parse_window(window))
    async with engine.connect() as connection:
        sums = await sum_by_touchpoint(connection, tenant, journey.id, stage.id, window_span)
    seen = {touchpoint for touchpoint, _ in sums}
    keys = [*sums, *((touchpoint, "") for touchpoint in stage.touchpoints if touchpoint not in seen)]
    rows = []
    for touchpoint, channel in sorted(keys, key=lambda key: _touchpoint_order(stage, key)):
        figures = _figures(sums.get((touchpoint, channel)), stage)
        rows.append(TouchpointRow(touchpoint=touchpoint or None, channel=channel or None, **figures))
    return TouchpointsResponse(
        journey=journey.id, stage=stage.id, window=window, from_=window_span.start, to=window_span.end, touchpoints=rows
    )


def _step_starts(window: Window, step: timedelta, seen: set[datetime]) -> list[datetime]:
    """Every step from the window's start up to the one holding `now`, and any later one with events."""
    starts = []
    start = window.start
    while start <= window.end:
        starts.append(start)
        start += step
    return sorted({*starts, *seen})


@router.get(
    "/{journey}/stages/{stage}/series",
    summary="Figures of a stage per step over a window",
    description="The window cut into steps from `from`, each row a step (empty steps have "
    "`events: 0`); the last step is the one in progress. `step` is >= 1m, <= the window, "
    "at most 1000 steps; by default a round step giving at most 60 points.",
    response_model=SeriesResponse,
    responses={**NOT_FOUND, **INVALID, **UNAVAILABLE},
)
async def stage_series(
    journey: JourneyDep,
    stage: StageDep,
    engine: EngineDep,
    tenant: TenantDep,
    now: NowDep,
    window: WindowQuery = "24h",
    step: Annotated[str | None, Query(description="Step: <n>m, <n>h or <n>d, e.g. 1h")] = None,
) -> SeriesResponse:
    window_length = parse_window(window)
    step_length = parse_step(step, window_length)
    window_span = Window.ending_at(now, window_length)
    async with engine.connect() as connection:
        sums = await sum_by_step(connection, tenant, journey.id, stage.id, window_span, step_length)
    points = [
        SeriesPoint(from_=start, to=start + step_length, **_figures(sums.get(start), stage))
        for start in _step_starts(window_span, step_length, set(sums))
    ]
    return SeriesResponse(
        journey=journey.id,
        stage=stage.id,
        window=window,
        step=step or format_duration(step_length),
        from_=window_span.start,
        to=window_span.end,
        points=points,
    )

