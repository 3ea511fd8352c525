"""Per-tenant journey maps (SPEC 2, issue: access control part 3): list, create, update, retire,
and read the version history. Needs the `admin` scope.

Every change appends a version to `tenant_journeys`; nothing is overwritten. A tenant sees the
shipped maps (version 0) until it replaces or retires one, plus the journeys it created. Events
carry the promise and weight they were scored with, so a new version changes what is scored
from then on and never what was scored before. Other processes see a change within
`CEM_JOURNEYS_REFRESH_S` (5 s); this process at once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Request, Response
from pydantic import BaseModel, Field

from services.api.deps import EngineDep, SettingsDep
from services.api.errors import (
    CONFLICT, INVALID, NOT_FOUND, PRECONDITION_FAILED, UNAVAILABLE, Conflict, InvalidBody, InvalidParameter,
    NotFound, PreconditionFailed,
)  # fmt: skip
from services.api.journeys import JourneyMap
from services.core.access import AdminCaller, Caller
from services.core.db import journeys as stored
from services.core.db.journeys import JourneyLoader
from services.core.http import AUTH_RESPONSES
from services.core.journeys import Journey, JourneyError, JourneyVersion, parse_journey

router = APIRouter(prefix="/v1/admin/journeys", tags=["admin: journey maps"], responses=AUTH_RESPONSES)

SCHEMA_ALLOWED = "a journey map valid against schemas/journey.schema.json"
BODY_EXAMPLE = {
    "id": "pop-up-store",
    "name": "Pop-up store",
    "revenue_threshold": 300.0,
    "experience_threshold": 0.0,
    "stages": [
        {"id": "entry", "name": "Entry", "promise": 7.0, "touchpoints": ["door", "greeter"]},
        {"id": "checkout", "name": "Checkout", "promise": 8.0, "weight": 2.0, "touchpoints": ["till", "app"]},
    ],
}


class JourneyVersionOut(BaseModel):
    journey_id: str
    version: int = Field(description="0: the shipped map, not changed by this tenant; then 1, 2, ...")
    source: Literal["shipped", "tenant"]
    retired: bool = Field(description="This version retired the journey: events naming it are refused")
    created_at: datetime | None = Field(description="When the version was stored; null for a shipped map")
    created_by: str | None = Field(description="The prefix of the API key that stored it")
    map: JourneyMap | None = Field(description="The journey map; null when retired")


class JourneyVersionList(BaseModel):
    items: list[JourneyVersionOut]


def _out(version: JourneyVersion) -> JourneyVersionOut:
    return JourneyVersionOut(
        journey_id=version.journey_id, version=version.version, source="tenant", retired=version.journey is None,
        created_at=version.created_at, created_by=version.created_by,
        map=JourneyMap(**version.journey.to_dict()) if version.journey is not None else None,
    )  # fmt: skip


def _shipped_out(journey: Journey) -> JourneyVersionOut:
    return JourneyVersionOut(
        journey_id=journey.id, version=0, source="shipped", retired=False, created_at=None, created_by=None,
        map=JourneyMap(**journey.to_dict()),
    )  # fmt: skip


def _etag(version: int) -> str:
    return f'"{version}"'


def _expected_version(if_match: str | None) -> int | None:
    """The version an `If-Match: "N"` header names (None: no header, change whatever is current)."""
    if if_match is None:
        return None
    tag = if_match.strip().removeprefix("W/").strip('"')
    if not tag.isdigit():
        raise InvalidParameter("if-match", f"not a journey version: {if_match!r}", 'an ETag of this API, e.g. "3"')
    return int(tag)


def _parse_body(document: dict[str, Any]) -> Journey:
    try:
        return parse_journey(document)
    except JourneyError as error:
        raise InvalidBody(error.problems, SCHEMA_ALLOWED) from None


def _loader(request: Request) -> JourneyLoader:
    return request.app.state.journey_loader


async def _current(conn, request: Request, tenant: str, journey_id: str) -> JourneyVersionOut | None:
    """The live version of a journey for the tenant (stored or shipped); None: unknown or retired."""
    found = await stored.latest_version(conn, tenant, journey_id)
    if found is not None:
        return _out(found) if found.journey is not None else None
    shipped = _loader(request).catalog.shipped.get(journey_id)
    return _shipped_out(shipped) if shipped is not None else None


async def _live_ids(conn, request: Request, tenant: str) -> list[JourneyVersionOut]:
    catalog = _loader(request).catalog
    await _loader(request).refresh(conn)  # authoritative for admin reads, and fresh for this process
    by_id = {journey.id: _shipped_out(journey) for journey in catalog.shipped.values()}
    for version in catalog.latest(tenant):
        by_id[version.journey_id] = _out(version)
    return [item for item in by_id.values() if not item.retired]


def _check_precondition(journey_id: str, current: JourneyVersionOut, if_match: str | None) -> None:
    expected = _expected_version(if_match)
    if expected is not None and expected != current.version:
        raise PreconditionFailed(
            "if-match",
            f"journey '{journey_id}' is at version {current.version}, not {expected}; read it again and reapply "
            "your change",
            _etag(current.version),
        )


async def _append(
    conn, request: Request, caller: Caller, journey_id: str, document: dict | None, base_version: int
) -> JourneyVersionOut:
    version = await stored.append_version(conn, caller.tenant, journey_id, document, base_version, caller.key_prefix)
    if version is None:
        raise Conflict(
            "journey", f"journey '{journey_id}' was changed at the same time by another request; read it and retry"
        )
    return _out(version)


IfMatch = Annotated[
    str | None,
    Header(description='Change only if the journey is still at this version (its ETag, e.g. "3"); else 412'),
]
JourneyBody = Annotated[
    dict[str, Any],
    Body(description=f"The whole journey map: {SCHEMA_ALLOWED}", openapi_examples={"new": {"value": BODY_EXAMPLE}}),
]


@router.get(
    "",
    summary="The tenant's live journey maps, with their versions",
    response_model=JourneyVersionList,
    responses={**INVALID, **UNAVAILABLE},
)
async def list_tenant_journeys(request: Request, caller: AdminCaller, engine: EngineDep) -> JourneyVersionList:
    async with engine.connect() as conn:
        return JourneyVersionList(items=await _live_ids(conn, request, caller.tenant))


@router.post(
    "",
    summary="Create a journey map (version 1)",
    status_code=201,
    response_model=JourneyVersionOut,
    responses={**INVALID, **CONFLICT, **UNAVAILABLE},
)
async def create_journey(
    request: Request, response: Response, caller: AdminCaller, engine: EngineDep, settings: SettingsDep,
    document: JourneyBody,
) -> JourneyVersionOut:  # fmt: skip
    journey = _parse_body(document)
    async with engine.begin() as conn:
        live = await _live_ids(conn, request, caller.tenant)
        if any(item.journey_id == journey.id for item in live):
            raise Conflict(
                "body.id", f"journey '{journey.id}' exists; change it with PUT /v1/admin/journeys/{journey.id}",
                [item.journey_id for item in live],
            )  # fmt: skip
        if len(live) >= settings.journeys_per_tenant_max:
            raise Conflict(
                "body.id", f"the tenant has {len(live)} journeys, the most allowed; retire one first",
                f"at most {settings.journeys_per_tenant_max} journeys (CEM_JOURNEYS_PER_TENANT_MAX)",
            )  # fmt: skip
        previous = await stored.latest_version(conn, caller.tenant, journey.id)  # a retired one: continue its history
        created = await _append(conn, request, caller, journey.id, document, previous.version if previous else 0)
    await _loader(request).refresh_with(engine)
    response.headers["Location"] = f"/v1/admin/journeys/{journey.id}"
    response.headers["ETag"] = _etag(created.version)
    return created


@router.get(
    "/{journey}",
    summary="One live journey map and its version",
    response_model=JourneyVersionOut,
    responses={**NOT_FOUND, **INVALID, **UNAVAILABLE},
)
async def get_tenant_journey(
    journey: str, request: Request, response: Response, caller: AdminCaller, engine: EngineDep
) -> JourneyVersionOut:
    async with engine.connect() as conn:
        current = await _current(conn, request, caller.tenant, journey)
        if current is None:
            live = [item.journey_id for item in await _live_ids(conn, request, caller.tenant)]
            raise NotFound("journey", f"no live journey '{journey}'", live)
    response.headers["ETag"] = _etag(current.version)
    return current


@router.put(
    "/{journey}",
    summary="Replace a journey map: a new version",
    description="Stores the whole map as the next version (a shipped map becomes version 1). Scoring "
    "uses it for events accepted from then on; what was scored before keeps the promise and weight "
    "it was scored with. `If-Match` makes the change conditional on the version you read.",
    response_model=JourneyVersionOut,
    responses={**NOT_FOUND, **INVALID, **CONFLICT, **PRECONDITION_FAILED, **UNAVAILABLE},
)
async def replace_journey(
    journey: str, request: Request, response: Response, caller: AdminCaller, engine: EngineDep,
    document: JourneyBody, if_match: IfMatch = None,
) -> JourneyVersionOut:  # fmt: skip
    parsed = _parse_body(document)
    if parsed.id != journey:
        raise InvalidParameter("body.id", f"the map's id '{parsed.id}' differs from the path's '{journey}'", journey)
    async with engine.begin() as conn:
        current = await _current(conn, request, caller.tenant, journey)
        if current is None:
            raise NotFound("journey", f"no live journey '{journey}'; create it with POST /v1/admin/journeys")
        _check_precondition(journey, current, if_match)
        changed = await _append(conn, request, caller, journey, document, current.version)
    await _loader(request).refresh_with(engine)
    response.headers["ETag"] = _etag(changed.version)
    return changed


@router.delete(
    "/{journey}",
    summary="Retire a journey: a new version without a map",
    description="Events naming the journey are refused from then on (within the refresh interval in "
    "other processes); its figures stay readable in the history. POST re-creates it as the next version.",
    response_model=JourneyVersionOut,
    responses={**NOT_FOUND, **INVALID, **CONFLICT, **PRECONDITION_FAILED, **UNAVAILABLE},
)
async def retire_journey(
    journey: str, request: Request, caller: AdminCaller, engine: EngineDep, if_match: IfMatch = None
) -> JourneyVersionOut:
    async with engine.begin() as conn:
        current = await _current(conn, request, caller.tenant, journey)
        if current is None:
            raise NotFound("journey", f"no live journey '{journey}'")
        _check_precondition(journey, current, if_match)
        retired = await _append(conn, request, caller, journey, None, current.version)
    await _loader(request).refresh_with(engine)
    return retired


@router.get(
    "/{journey}/versions",
    summary="Every version of a journey, newest first",
    response_model=JourneyVersionList,
    responses={**NOT_FOUND, **INVALID, **UNAVAILABLE},
)
async def journey_history(journey: str, request: Request, caller: AdminCaller, engine: EngineDep) -> JourneyVersionList:
    async with engine.connect() as conn:
        versions = [_out(version) for version in await stored.history(conn, caller.tenant, journey)]
    shipped = _loader(request).catalog.shipped.get(journey)
    if shipped is not None:
        versions.append(_shipped_out(shipped))
    if not versions:
        raise NotFound("journey", f"journey '{journey}' has no versions")
    return JourneyVersionList(items=versions)


@router.get(
    "/{journey}/versions/{version}",
    summary="One version of a journey",
    response_model=JourneyVersionOut,
    responses={**NOT_FOUND, **INVALID, **UNAVAILABLE},
)
async def journey_version(
    journey: str, version: int, request: Request, caller: AdminCaller, engine: EngineDep
) -> JourneyVersionOut:
    history = await journey_history(journey, request, caller, engine)
    for item in history.items:
        if item.version == version:
            return item
    versions = [str(item.version) for item in history.items]
    raise NotFound("version", f"journey '{journey}' has no version {version}", versions)
