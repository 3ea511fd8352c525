"""Customer resources: one customer's scores and stages, and the filtered, ordered customer list."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy import ColumnElement, and_, bindparam, or_, select, tuple_

from services.api.alerts import Alert
from services.api.deps import (
    EngineDep, JourneysDep, NowDep, SettingsDep, TenantDep, autocommit_connection, journey_filter,
)  # fmt: skip
from services.api.errors import INVALID, NOT_FOUND, UNAVAILABLE, NotFound
from services.api.parameters import (
    ORDERS,
    Cursor,
    Order,
    decode_cursor,
    encode_cursor,
    parse_limit,
    parse_order,
    parse_quadrant,
)
from services.core.revenue import revenue_at
from services.core.access import requires
from services.core.alerting import CUSTOMER_KINDS, alert_document
from services.core.auth import SCORES_READ
from services.core.db.schema import alerts, customer_stages, customers
from services.core.http import AUTH_RESPONSES
from services.core.journeys import Journey
from services.core.scoring import QUADRANTS, CustomerStageState, epoch_seconds

router = APIRouter(
    prefix="/v1/customers", tags=["customers"], dependencies=[requires(SCORES_READ)], responses=AUTH_RESPONSES
)

Quadrant = Literal["exemplary", "growth", "at_risk", "disengaged"]
assert set(Quadrant.__args__) == set(QUADRANTS)


# --------------------------------------------------------------------------------------------
# Response models.


class CustomerSummary(BaseModel):
    customer_id: str
    experience_index: float = Field(
        description="Decayed, stage-weighted mean gap (experience - expectation) of all the customer's events"
    )
    revenue: float = Field(description="Decayed revenue valued at query time")
    quadrant: Quadrant = Field(description="Positioning-map quadrant, by the thresholds of the latest journey")
    trend: float = Field(description="Index with the 7-day half-life minus the index; < 0: getting worse lately")
    event_count: int
    last_event_at: datetime
    latest_journey: str


class CustomerStage(BaseModel):
    journey: str
    stage: str
    gap: float = Field(description="Decayed mean gap of the customer's events at this stage")
    events: int
    last_event_at: datetime


class Customer(CustomerSummary):
    first_event_at: datetime
    updated_at: datetime
    stages: list[CustomerStage] = Field(description="Journey order, then stage order of the journey map")
    open_alerts: list[Alert] = Field(description="The customer's alerts that are not resolved, oldest first")


class CustomerPage(BaseModel):
    items: list[CustomerSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


def _summary(row, now: datetime, revenue_half_life_s: float) -> dict:
    return {
        "customer_id": row.customer_id,
        "experience_index": row.experience_index,
        "revenue": revenue_at(row.revenue_sum, row.last_event_at, now, revenue_half_life_s),
        "quadrant": row.quadrant,
        "trend": row.trend,
        "event_count": row.events,
        "last_event_at": row.last_event_at,
        "latest_journey": row.latest_journey,
    }


_SUMMARY_COLUMNS = [
    customers.c.customer_id, customers.c.experience_index, customers.c.revenue_sum, customers.c.quadrant,
    customers.c.trend, customers.c.events, customers.c.last_event_at, customers.c.latest_journey,
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# One customer.


def _stage_gap(row) -> float:
    state = CustomerStageState(
        ref_s=epoch_seconds(row.stage_last_event_at),
        gap_sum=row.stage_gap_sum,
        weight_sum=row.stage_weight_sum,
        events=row.stage_events,
    )
    return state.gap  # a decayed mean: the same at any reference time


def _stage_position(journeys: dict[str, Journey], journey_id: str, stage_id: str) -> tuple:
    # Unknown journeys or stages (removed from the maps) go last, by name.
    order = list(journeys)
    journey = journeys.get(journey_id)
    journey_position = order.index(journey_id) if journey else len(order)
    stage_ids = journey.stage_ids if journey else []
    stage_position = stage_ids.index(stage_id) if stage_id in stage_ids else len(stage_ids)
    return (journey_position, journey_id, stage_position, stage_id)


# One statement, so the customer, their stages and their open alerts come from the same snapshot
# in one round trip: a row per (stage, open alert), at most one open alert per kind (the partial
# unique index), so a few rows. Built once: building and cache-keying a select per request was
# ~8 % of the lookup's samples.
_stage = customer_stages.c
_ALERT_COLUMNS = [column.label(f"alert_{column.name}") for column in alerts.c]
_CUSTOMER_QUERY = (
    select(
        *_SUMMARY_COLUMNS,
        customers.c.first_event_at,
        customers.c.updated_at,
        _stage.journey.label("stage_journey"),
        _stage.stage.label("stage_stage"),
        _stage.gap_sum.label("stage_gap_sum"),
        _stage.weight_sum.label("stage_weight_sum"),
        _stage.events.label("stage_events"),
        _stage.last_event_at.label("stage_last_event_at"),
        *_ALERT_COLUMNS,
    )
    .select_from(
        customers.outerjoin(
            customer_stages, and_(_stage.tenant == customers.c.tenant, _stage.customer_id == customers.c.customer_id)
        ).outerjoin(
            alerts,
            and_(
                alerts.c.tenant == customers.c.tenant,
                alerts.c.subject == customers.c.customer_id,
                alerts.c.kind.in_(CUSTOMER_KINDS),
                alerts.c.status != "resolved",
            ),
        )
    )
    .where(customers.c.tenant == bindparam("tenant"), customers.c.customer_id == bindparam("customer_id"))
)


def _open_alerts(rows) -> list[Alert]:
    """The distinct alerts of the lookup's rows, oldest first (ties by id), as the alerts resource shows them."""
    found = {}
    for row in rows:
        if row.alert_id is not None:
            found[row.alert_id] = SimpleNamespace(
                **{column.name: getattr(row, f"alert_{column.name}") for column in alerts.c}
            )
    ordered = sorted(found.values(), key=lambda alert: (alert.opened_at, alert.id))
    return [Alert(**alert_document(alert)) for alert in ordered]


@router.get(
    "/{customer_id:path}",
    summary="Get one customer",
    description="Experience index, revenue valued now, quadrant, trend, and the decayed mean gap "
    "per journey stage.",
    response_model=Customer,
    responses={**NOT_FOUND, **UNAVAILABLE},
)
async def get_customer(
    customer_id: Annotated[str, Path(description="The customer id events carry")],
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
    journeys: JourneysDep,
    now: NowDep,
) -> Customer:
    async with autocommit_connection(engine) as connection:
        rows = (await connection.execute(_CUSTOMER_QUERY, {"tenant": tenant, "customer_id": customer_id})).all()
    if not rows:
        raise NotFound("customer_id", f"customer '{customer_id}' has never been seen")
    stage_rows = {(row.stage_journey, row.stage_stage): row for row in rows if row.stage_journey is not None}
    stages = sorted(
        (
            CustomerStage(
                journey=row.stage_journey,
                stage=row.stage_stage,
                gap=_stage_gap(row),
                events=row.stage_events,
                last_event_at=row.stage_last_event_at,
            )
            for row in stage_rows.values()
        ),
        key=lambda stage_row: _stage_position(journeys, stage_row.journey, stage_row.stage),
    )
    first = rows[0]
    return Customer(
        **_summary(first, now, settings.revenue_half_life_s),
        first_event_at=first.first_event_at,
        updated_at=first.updated_at,
        stages=stages,
        open_alerts=_open_alerts(rows),
    )


# --------------------------------------------------------------------------------------------
# The list, by keyset pagination.

_SORT_COLUMNS = {
    "revenue": customers.c.revenue_rank,
    "experience_index": customers.c.experience_index,
    "last_event_at": customers.c.last_event_at,
}


def _ids_descending(order: Order) -> bool:
    """The tie-break direction that lets each order scan its index one way: the revenue indexes
    are (revenue_rank DESC, customer_id), the others (key, customer_id)."""
    if order.field == "revenue":
        return not order.descending
    return order.descending


def _after(order: Order, cursor: Cursor) -> ColumnElement[bool]:
    """Rows strictly after the cursor in the order (key, then customer id)."""
    key, customer_id = _SORT_COLUMNS[order.field], customers.c.customer_id
    ids_descending = _ids_descending(order)
    if order.descending == ids_descending:
        # A row comparison, which Postgres answers with one index range.
        if order.descending:
            return tuple_(key, customer_id) < tuple_(cursor.key, cursor.id)
        return tuple_(key, customer_id) > tuple_(cursor.key, cursor.id)
    beyond_key = key < cursor.key if order.descending else key > cursor.key
    at_key = key <= cursor.key if order.descending else key >= cursor.key  # the index range
    beyond_id = customer_id < cursor.id if ids_descending else customer_id > cursor.id
    return and_(at_key, or_(beyond_key, beyond_id))


def _sort_key(order: Order, row) -> float | datetime:
    return getattr(row, "revenue_rank" if order.field == "revenue" else order.field)


@router.get(
    "",
    summary="List customers",
    description="Filtered by quadrant and by the journey of their latest event, ordered by "
    "`revenue` (valued now), `experience_index` or `last_event_at` (`-` prefix: descending; ties "
    "by customer id). Pages are keyset-paginated: pass `next_cursor` back as `cursor`.",
    response_model=CustomerPage,
    responses={**INVALID, **UNAVAILABLE},
)
async def list_customers(
    engine: EngineDep,
    tenant: TenantDep,
    settings: SettingsDep,
    journeys: JourneysDep,
    now: NowDep,
    quadrant: Annotated[
        str | None, Query(description="Only this quadrant", json_schema_extra={"enum": list(QUADRANTS)})
    ] = None,
    journey: Annotated[str | None, Query(description="Only customers whose latest event was in this journey")] = None,
    order: Annotated[str, Query(description="Sort order", json_schema_extra={"enum": list(ORDERS)})] = "-revenue",
    limit: Annotated[int, Query(description="Page size, 1-500")] = 50,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> CustomerPage:
    quadrant = parse_quadrant(quadrant)
    journey = journey_filter(journey, journeys)
    sort = parse_order(order)
    limit = parse_limit(limit, settings.page_limit_max)
    after = decode_cursor(cursor, sort) if cursor is not None else None

    key = _SORT_COLUMNS[sort.field]
    query = select(*_SUMMARY_COLUMNS, customers.c.revenue_rank).where(customers.c.tenant == tenant)
    if quadrant is not None:
        query = query.where(customers.c.quadrant == quadrant)
    if journey is not None:
        query = query.where(customers.c.latest_journey == journey)
    if after is not None:
        query = query.where(_after(sort, after))
    query = query.order_by(
        key.desc() if sort.descending else key.asc(),
        customers.c.customer_id.desc() if _ids_descending(sort) else customers.c.customer_id.asc(),
    ).limit(limit + 1)  # one more tells whether there is a next page

    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = encode_cursor(Cursor(order=sort.text, key=_sort_key(sort, last), id=last.customer_id))
    return CustomerPage(
        items=[CustomerSummary(**_summary(row, now, settings.revenue_half_life_s)) for row in page],
        next_cursor=next_cursor,
    )
