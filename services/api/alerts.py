"""Alert resources (SPEC 7): the list, one alert, acknowledge and resolve, and the live stream.

Scoring opens, updates and resolves alerts in its batch transactions; people acknowledge and
resolve them here. Every status change is appended to alert_transitions, which the stream
(Server-Sent Events, `id` = the transition's seq) and the scoring relays (Kafka, webhook) read.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Path, Query, Security
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, and_, func, or_, select
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.api.deps import (
    AlertsWriterTenantDep, EngineDep, JourneysDep, NowDep, SettingsDep, TenantDep, journey_filter,
)  # fmt: skip
from services.api.errors import (
    CONFLICT,
    INVALID,
    NOT_FOUND,
    TRANSIENT_DATABASE_ERRORS,
    UNAVAILABLE,
    Conflict,
    InvalidParameter,
    NotFound,
)
from services.api.parameters import (
    Cursor,
    Order,
    decode_cursor,
    encode_cursor,
    parse_choices,
    parse_limit,
    parse_order,
)
from services.core.alerting import (
    KINDS,
    SEVERITIES,
    STATUSES,
    IllegalTransition,
    alert_document,
    manual_transition,
    transition_document,
    transition_payload,
)
from services.core.access import get_caller
from services.core.db.alerts import NewTransition, record_transitions
from services.core.http import AUTH_RESPONSES
from services.core.db.schema import alert_transitions, alerts

log = logging.getLogger("cem.api.alerts")

# Reads need scores:read (TenantDep), acknowledge and resolve alerts:write (AlertsWriterTenantDep).
router = APIRouter(
    prefix="/v1/alerts", tags=["alerts"], dependencies=[Security(get_caller)], responses=AUTH_RESPONSES
)  # the key first (401 before anything else); each route's scope then

Kind = Literal["customer_at_risk", "customer_hot", "stage_shortfall"]
Status = Literal["open", "acknowledged", "resolved"]
Severity = Literal["critical", "high", "medium", "low"]
assert set(Kind.__args__) == set(KINDS) and set(Status.__args__) == set(STATUSES)
assert set(Severity.__args__) == set(SEVERITIES)

ALERT_ORDERS = ("-opened_at", "opened_at", "-revenue_at_stake", "revenue_at_stake")
STREAM_PAGE = 500
STREAM_RETRY_MS = 2000


class Alert(BaseModel):
    id: str
    kind: Kind
    subject: str = Field(description="The customer id, or `journey/stage` for stage_shortfall")
    journey: str
    severity: Severity = Field(
        description="From the value at stake in multiples of the journey's revenue threshold T: "
        ">= 10 T critical, >= 3 T high, >= T medium, else low"
    )
    status: Status
    opened_at: datetime
    updated_at: datetime = Field(description="Last change: new figures from a repeated trigger, or a status change")
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    revenue_at_stake: float | None = Field(
        description="The customer's revenue valued at the last update, or the revenue of the stage's window"
    )
    evidence: dict[str, Any] = Field(description="The figures and thresholds that raised (and resolved) the alert")
    acknowledged_by: str | None
    resolved_by: str | None = Field(description="null when it resolved by itself")
    note: str | None


class AlertPage(BaseModel):
    items: list[Alert]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class AlertCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: str = Field(min_length=1, max_length=128, description="Who acts (a person or a system)")
    note: str | None = Field(None, max_length=2000, description="Why, or what was done")


_COLUMNS = [
    alerts.c.id, alerts.c.kind, alerts.c.subject, alerts.c.journey, alerts.c.severity, alerts.c.status,
    alerts.c.opened_at, alerts.c.updated_at, alerts.c.acknowledged_at, alerts.c.resolved_at,
    alerts.c.revenue_at_stake, alerts.c.evidence, alerts.c.acknowledged_by, alerts.c.resolved_by, alerts.c.note,
]  # fmt: skip


def _alert(row) -> Alert:
    return Alert(**alert_document(row))


# --------------------------------------------------------------------------------------------
# The list, by keyset pagination. Both indexes are (key DESC, id): a descending order breaks
# ties by ascending id and an ascending one by descending id, so each page is one index range.

_SORT_COLUMNS = {"opened_at": alerts.c.opened_at, "revenue_at_stake": alerts.c.revenue_at_stake}


def _after(order: Order, cursor: Cursor) -> ColumnElement[bool]:
    key, alert_id = _SORT_COLUMNS[order.field], alerts.c.id
    cursor_id = uuid.UUID(cursor.id)
    beyond_key = key < cursor.key if order.descending else key > cursor.key
    at_key = key <= cursor.key if order.descending else key >= cursor.key
    beyond_id = alert_id > cursor_id if order.descending else alert_id < cursor_id
    return and_(at_key, or_(beyond_key, beyond_id))


def _parse_cursor(cursor: str, order: Order) -> Cursor:
    after = decode_cursor(cursor, order)
    try:
        uuid.UUID(after.id)
    except ValueError as error:
        raise InvalidParameter(
            "cursor", "invalid cursor: not one this API issued", "a next_cursor returned by this endpoint"
        ) from error
    return after


@router.get(
    "",
    summary="List alerts",
    description="Filtered by status, kind, severity (each one value or several, comma-separated), "
    "subject and journey; ordered by `opened_at` or `revenue_at_stake` (`-` prefix: descending). "
    "Pages are keyset-paginated: pass `next_cursor` back as `cursor`.",
    response_model=AlertPage,
    responses={**INVALID, **UNAVAILABLE},
)
async def list_alerts(
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
    journeys: JourneysDep,
    status: Annotated[str | None, Query(description="open, acknowledged, resolved; comma-separated")] = None,
    kind: Annotated[str | None, Query(description=f"{', '.join(KINDS)}; comma-separated")] = None,
    severity: Annotated[str | None, Query(description=f"{', '.join(SEVERITIES)}; comma-separated")] = None,
    subject: Annotated[str | None, Query(description="A customer id, or journey/stage")] = None,
    journey: Annotated[str | None, Query(description="Only alerts about this journey")] = None,
    order: Annotated[
        str, Query(description="Sort order", json_schema_extra={"enum": list(ALERT_ORDERS)})
    ] = "-opened_at",
    limit: Annotated[int, Query(description="Page size, 1-500")] = 50,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> AlertPage:
    statuses = parse_choices("status", status, STATUSES)
    kinds = parse_choices("kind", kind, KINDS)
    severities = parse_choices("severity", severity, SEVERITIES)
    journey = journey_filter(journey, journeys)
    sort = parse_order(order, ALERT_ORDERS)
    limit = parse_limit(limit, settings.page_limit_max)
    after = _parse_cursor(cursor, sort) if cursor is not None else None

    query = select(*_COLUMNS).where(alerts.c.tenant == tenant)
    for column, chosen in ((alerts.c.status, statuses), (alerts.c.kind, kinds), (alerts.c.severity, severities)):
        if chosen is not None:
            query = query.where(column.in_(chosen))
    if subject is not None:
        query = query.where(alerts.c.subject == subject)
    if journey is not None:
        query = query.where(alerts.c.journey == journey)
    if after is not None:
        query = query.where(_after(sort, after))
    key = _SORT_COLUMNS[sort.field]
    query = query.order_by(
        key.desc() if sort.descending else key.asc(),
        alerts.c.id.asc() if sort.descending else alerts.c.id.desc(),
    ).limit(limit + 1)

    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = encode_cursor(Cursor(order=sort.text, key=getattr(last, sort.field), id=str(last.id)))
    return AlertPage(items=[_alert(row) for row in page], next_cursor=next_cursor)


# --------------------------------------------------------------------------------------------
# The live stream. Declared before /{alert_id}, which would otherwise take "stream" for an id.


def _parse_last_event_id(header: str | None, query: str | None) -> int | None:
    # A reconnecting EventSource sends the header; it wins over the id in the original URL.
    field, value = ("Last-Event-ID", header) if header is not None else ("last_event_id", query)
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        message = f"invalid {field} '{value}': the id of an event of this stream"
        raise InvalidParameter(field, message, "an integer >= 0")
    return int(value)


def _transitions_after(tenant: str, last: int, limit: int):
    return (
        select(alert_transitions)
        .where(alert_transitions.c.tenant == tenant, alert_transitions.c.seq > last)
        .order_by(alert_transitions.c.seq)
        .limit(limit)
    )


@router.get(
    "/stream",
    summary="Live alert transitions (Server-Sent Events)",
    description="Each transition (opened, acknowledged, resolved) as an event `alert` whose `id` is the "
    "transition's sequence number and whose `data` is JSON: `seq, tenant, alert_id, kind, subject, from, "
    "to, at, reason, by, note, alert`. Without `Last-Event-ID` (header, or `last_event_id` query "
    "parameter) the stream starts with the next transition; with it, with the first transition after "
    "that id, so a reconnecting client misses nothing (`last_event_id=0`: from the beginning). "
    "Comment lines are heartbeats.",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **INVALID, **UNAVAILABLE},
)
async def stream_alerts(
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Query(description="Resume after this event id")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
) -> EventSourceResponse:
    start = _parse_last_event_id(last_event_id_header, last_event_id)
    if start is None:
        # Before the response starts, so an unreachable database is a 503 like anywhere else.
        async with engine.connect() as connection:
            start = await connection.scalar(
                select(func.coalesce(func.max(alert_transitions.c.seq), 0)).where(alert_transitions.c.tenant == tenant)
            )
    poll_s = settings.alert_stream_poll_s

    async def events() -> AsyncIterator[ServerSentEvent]:
        last = start
        yield ServerSentEvent(comment=f"alert transitions after {last}", retry=STREAM_RETRY_MS)
        while True:
            try:
                async with engine.connect() as connection:
                    rows = (await connection.execute(_transitions_after(tenant, last, STREAM_PAGE))).all()
            except TRANSIENT_DATABASE_ERRORS as error:
                # Keep the client: it resumes where it was once the database is back.
                log.warning("alert stream: database unavailable (%s)", error)
                await asyncio.sleep(max(poll_s, 1.0))
                continue
            for row in rows:
                last = row.seq
                yield ServerSentEvent(
                    data=orjson.dumps(transition_document(row)).decode(), event="alert", id=str(row.seq)
                )
            if len(rows) < STREAM_PAGE:
                await asyncio.sleep(poll_s)

    return EventSourceResponse(events(), ping=settings.alert_stream_ping_s, sep="\n")


# --------------------------------------------------------------------------------------------
# One alert, and what people do with it.

AlertId = Annotated[str, Path(description="The alert's id")]


def _alert_uuid(alert_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(alert_id)
    except ValueError as error:
        raise NotFound("alert_id", f"alert '{alert_id}' does not exist") from error


@router.get(
    "/{alert_id}",
    summary="Get one alert",
    response_model=Alert,
    responses={**NOT_FOUND, **UNAVAILABLE},
)
async def get_alert(alert_id: AlertId, engine: EngineDep, tenant: TenantDep) -> Alert:
    found = _alert_uuid(alert_id)
    async with engine.connect() as connection:
        query = select(*_COLUMNS).where(alerts.c.tenant == tenant, alerts.c.id == found)
        row = (await connection.execute(query)).first()
    if row is None:
        raise NotFound("alert_id", f"alert '{alert_id}' does not exist")
    return _alert(row)


def _allowed_commands(status: str) -> list[str]:
    allowed = []
    for command in ("acknowledge", "resolve"):
        try:
            manual_transition(status, command)
            allowed.append(command)
        except IllegalTransition:
            pass
    return allowed


async def _command(
    command: str, alert_id: str, body: AlertCommand, engine, tenant: str, now: datetime
) -> Alert:
    found = _alert_uuid(alert_id)
    async with engine.begin() as connection:
        row = (
            await connection.execute(
                select(*_COLUMNS).where(alerts.c.tenant == tenant, alerts.c.id == found).with_for_update()
            )
        ).first()
        if row is None:
            raise NotFound("alert_id", f"alert '{alert_id}' does not exist")
        try:
            status = manual_transition(row.status, command)
        except IllegalTransition as why:
            done = ""
            if row.status == "resolved":
                done = f" (resolved at {row.resolved_at.isoformat()} by {row.resolved_by or 'scoring, automatically'})"
            elif row.status == "acknowledged":
                done = f" (acknowledged at {row.acknowledged_at.isoformat()} by {row.acknowledged_by})"
            allowed = _allowed_commands(row.status)
            raise Conflict(
                "status",
                f"cannot {command} alert {alert_id}: {why}{done}; "
                + (f"allowed now: {', '.join(allowed)}" if allowed else "nothing more can be done with it"),
                allowed,
            ) from why
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if body.note is not None:
            values["note"] = body.note
        if status == "acknowledged":
            values.update(acknowledged_at=now, acknowledged_by=body.by)
        else:
            values.update(resolved_at=now, resolved_by=body.by)
        updated = (
            await connection.execute(
                alerts.update()
                .where(alerts.c.tenant == tenant, alerts.c.id == found)
                .values(**values)
                .returning(*_COLUMNS)
            )
        ).one()
        document = alert_document(updated)
        await record_transitions(
            connection,
            [
                NewTransition(
                    tenant=tenant,
                    alert_id=updated.id,
                    kind=updated.kind,
                    subject=updated.subject,
                    from_status=row.status,
                    to_status=status,
                    at=now,
                    payload=transition_payload(document, f"{status} by {body.by}", body.by, body.note),
                )
            ],
        )
    return Alert(**document)


@router.post(
    "/{alert_id}/acknowledge",
    summary="Acknowledge an open alert",
    description="open -> acknowledged: someone is on it. The alert still resolves by itself when its "
    "rule stops holding (customer_at_risk, stage_shortfall). 409 if it is acknowledged or resolved already.",
    response_model=Alert,
    responses={**NOT_FOUND, **CONFLICT, **INVALID, **UNAVAILABLE},
)
async def acknowledge_alert(
    alert_id: AlertId, body: AlertCommand, engine: EngineDep, tenant: AlertsWriterTenantDep, now: NowDep
) -> Alert:
    return await _command("acknowledge", alert_id, body, engine, tenant, now)


@router.post(
    "/{alert_id}/resolve",
    summary="Resolve an alert",
    description="open or acknowledged -> resolved. If the rule still holds, the next evaluation opens a "
    "new alert for the subject. 409 if it is resolved already.",
    response_model=Alert,
    responses={**NOT_FOUND, **CONFLICT, **INVALID, **UNAVAILABLE},
)
async def resolve_alert(
    alert_id: AlertId, body: AlertCommand, engine: EngineDep, tenant: AlertsWriterTenantDep, now: NowDep
) -> Alert:
    return await _command("resolve", alert_id, body, engine, tenant, now)
