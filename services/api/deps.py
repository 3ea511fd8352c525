"""Request-scoped dependencies: settings, journeys, the engine, the clock, the tenant, path lookups.

Routes open their connection themselves (`async with engine.connect()`), after their parameters
are validated: bad input is a 422 even while the database is down, never a 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.api.errors import InvalidParameter, NotFound, NotReady
from services.core.access import AlertsWriterTenant, AnyCaller, ScoresReaderTenant
from services.core.journeys import Journey, Stage
from services.core.settings import Settings


# The dependencies are `async def`: FastAPI runs a plain `def` in its thread pool, a hop per
# dependency per request (7 % of the customer lookup's samples).
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


class _NotLoaded(Mapping[str, Journey]):
    """The journeys of a process that has not reached the database since it started: any use is a
    503. Lazy, so that a request whose parameters are invalid still gets its 422."""

    def _fail(self, *_):
        raise NotReady("(database)", "the tenants' journey maps are not loaded yet: the database is unreachable")

    __getitem__ = __iter__ = __len__ = _fail


async def get_journeys(request: Request, caller: AnyCaller) -> Mapping[str, Journey]:
    """The caller's tenant's journeys (shipped maps, replaced or extended by its own versions)."""
    catalog = request.app.state.journey_loader.catalog
    return catalog.of(caller.tenant) if catalog.loaded else _NotLoaded()


async def get_engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
JourneysDep = Annotated[Mapping[str, Journey], Depends(get_journeys)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


@asynccontextmanager
async def autocommit_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for reads of one statement each: no BEGIN and ROLLBACK around them, two round
    trips of the three a statement otherwise takes (asyncpg starts a transaction explicitly)."""
    async with engine.connect() as connection:
        yield await connection.execution_options(isolation_level="AUTOCOMMIT")


async def get_now() -> datetime:
    """Query time: the instant revenue is valued at and windows end at (tests pin it)."""
    return datetime.now(timezone.utc)


NowDep = Annotated[datetime, Depends(get_now)]


# The tenant every read is scoped to: the API key's (scope scores:read); changes to alerts need
# alerts:write. Resolved once, in services/core/access.py, for every service.
TenantDep = ScoresReaderTenant
AlertsWriterTenantDep = AlertsWriterTenant


async def get_journey(journey: str, journeys: JourneysDep) -> Journey:
    """The journey named in the path, or 404 listing the known journeys. `async`, like the others:
    as a plain `def` it ran in the thread pool, a fifth of the stages endpoint's samples."""
    found = journeys.get(journey)
    if found is None:
        known = list(journeys)
        raise NotFound("journey", f"unknown journey '{journey}'; known journeys: {', '.join(known)}", known)
    return found


JourneyDep = Annotated[Journey, Depends(get_journey)]


async def get_stage(stage: str, journey: JourneyDep) -> Stage:
    """The stage named in the path, or 404 listing the journey's stages."""
    found = journey.stage(stage)
    if found is None:
        known = journey.stage_ids
        raise NotFound(
            "stage", f"unknown stage '{stage}' in journey '{journey.id}'; known stages: {', '.join(known)}", known
        )
    return found


StageDep = Annotated[Stage, Depends(get_stage)]


def journey_filter(journey: str | None, journeys: Mapping[str, Journey]) -> str | None:
    """A `journey` query parameter (a filter, not a resource): 422 listing the known journeys."""
    if journey is not None and journey not in journeys:
        known = list(journeys)
        raise InvalidParameter("journey", f"unknown journey '{journey}'; known journeys: {', '.join(known)}", known)
    return journey
