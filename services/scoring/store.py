"""One scoring batch as one Postgres transaction: de-duplicate, fold into the aggregates, store
the consumed offsets (compare-and-set, so a consumer that lost its partition cannot commit)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.core.journeys import JourneyCatalog
from services.core.scoring import (
    CustomerStageState,
    CustomerState,
    HalfLives,
    ScoredEvent,
    bucket_events,
    from_epoch_seconds,
    merge_customer_events,
    quadrant,
    revenue_rank,
)


class StaleOffsets(RuntimeError):
    """The stored offsets moved under us: another consumer owns the partition now."""


@dataclass(frozen=True)
class PartitionRange:
    topic: str
    partition: int
    expected_next_offset: int | None  # what we believe is stored (None: nothing yet)
    next_offset: int  # last consumed offset + 1


@dataclass(frozen=True)
class TenantEvent:
    tenant: str
    event: ScoredEvent
    received_s: float
    payload_hash: bytes | None = None  # tells a client's retry from a different event under the same id


@dataclass(frozen=True)
class QuadrantChange:
    tenant: str
    customer_id: str
    previous: str | None
    current: str
    experience_index: float
    revenue: float
    journey: str


@dataclass
class BatchOutcome:
    scored: list[TenantEvent] = field(default_factory=list)
    duplicates: int = 0
    conflicting: int = 0  # duplicates whose payload differs from the one scored: ignored, counted
    quadrant_changes: list[QuadrantChange] = field(default_factory=list)
    customers: dict[tuple[str, str], CustomerState] = field(default_factory=dict)
    # The quadrant stored for every customer of the batch, and the instant revenue was valued at.
    quadrants: dict[tuple[str, str], str] = field(default_factory=dict)
    now: datetime | None = None


@dataclass(frozen=True)
class ScoringContext:
    group_id: str
    half_lives: HalfLives
    journeys: JourneyCatalog


async def load_offsets(conn: AsyncConnection, group_id: str, topic: str, partitions: list[int]) -> dict[int, int | None]:
    await conn.execute(
        text(
            "INSERT INTO consumer_offsets (group_id, topic, partition) "
            "SELECT :group_id, :topic, p FROM unnest(CAST(:partitions AS integer[])) AS p "
            "ON CONFLICT DO NOTHING"
        ),
        {"group_id": group_id, "topic": topic, "partitions": partitions},
    )
    rows = await conn.execute(
        text(
            "SELECT partition, next_offset FROM consumer_offsets "
            "WHERE group_id = :group_id AND topic = :topic AND partition = ANY(CAST(:partitions AS integer[]))"
        ),
        {"group_id": group_id, "topic": topic, "partitions": partitions},
    )
    return {row.partition: row.next_offset for row in rows}


async def score_batch(
    conn: AsyncConnection,
    events: list[TenantEvent],
    ranges: list[PartitionRange],
    context: ScoringContext,
    now: datetime,
) -> BatchOutcome:
    """Apply one batch inside the caller's transaction. Raises StaleOffsets if fenced off."""
    outcome = BatchOutcome(now=now)
    fresh, outcome.conflicting = await _claim_new_events(conn, events)
    outcome.duplicates = len(events) - len(fresh)
    outcome.scored = fresh

    by_tenant: dict[str, list[ScoredEvent]] = defaultdict(list)
    for item in fresh:
        by_tenant[item.tenant].append(item.event)
    for tenant, tenant_events in sorted(by_tenant.items()):
        await _add_stage_buckets(conn, tenant, tenant_events)
        customer_deltas, stage_deltas = merge_customer_events(tenant_events, context.half_lives)
        await _merge_customer_stages(conn, tenant, stage_deltas, context.half_lives)
        await _merge_customers(conn, tenant, customer_deltas, context, now, outcome)

    await _store_offsets(conn, context.group_id, ranges)
    return outcome


async def _claim_new_events(conn: AsyncConnection, events: list[TenantEvent]) -> tuple[list[TenantEvent], int]:
    """Record (tenant, event_id) of every event; keep those never seen before (first wins).

    Also returns how many of the others carried a payload different from the one kept: a client
    that reused an event id for another event (ignored, but counted so that someone looks).
    """
    unique: dict[tuple[str, str], TenantEvent] = {}
    conflicting = 0
    for item in events:
        key = (item.tenant, item.event.event_id)
        first = unique.setdefault(key, item)
        if first is not item and _differ(first.payload_hash, item.payload_hash):
            conflicting += 1
    if not unique:
        return [], 0
    rows = await conn.execute(
        text(
            "INSERT INTO processed_events (tenant, event_id, occurred_at, payload_hash) "
            "SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:event_ids AS text[]), "
            "CAST(:occurred AS timestamptz[]), CAST(:hashes AS bytea[])) "
            "ON CONFLICT DO NOTHING RETURNING tenant, event_id"
        ),
        {
            "tenants": [key[0] for key in unique],
            "event_ids": [key[1] for key in unique],
            "occurred": [from_epoch_seconds(item.event.occurred_s) for item in unique.values()],
            "hashes": [item.payload_hash for item in unique.values()],
        },
    )
    claimed = {(row.tenant, row.event_id) for row in rows}
    seen_before = [key for key in unique if key not in claimed]
    if seen_before:
        # A separate statement: it sees rows committed by other consumers since the INSERT began.
        stored = await conn.execute(
            text(
                "SELECT p.tenant, p.event_id, p.payload_hash FROM processed_events p "
                "JOIN unnest(CAST(:tenants AS text[]), CAST(:event_ids AS text[])) AS k(tenant, event_id) "
                "ON p.tenant = k.tenant AND p.event_id = k.event_id"
            ),
            {"tenants": [key[0] for key in seen_before], "event_ids": [key[1] for key in seen_before]},
        )
        for row in stored:
            if _differ(row.payload_hash, unique[(row.tenant, row.event_id)].payload_hash):
                conflicting += 1
    return [item for key, item in unique.items() if key in claimed], conflicting


def _differ(kept: bytes | None, other: bytes | None) -> bool:
    # Rows scored before payload hashes existed have none: no evidence of a conflict.
    return kept is not None and other is not None and bytes(kept) != bytes(other)


_BUCKET_SUMS = (
    "events", "expectation_sum", "expectation_sq_sum", "experience_sum", "experience_sq_sum", "gap_sum",
    "gap_sq_sum", "shortfall_events", "promise_kept_events", "negative_emotion_events", "revenue_sum",
)  # fmt: skip
_BUCKET_TYPES = {
    "events": "bigint", "shortfall_events": "bigint", "promise_kept_events": "bigint",
    "negative_emotion_events": "bigint",
}  # fmt: skip

_ADD_STAGE_BUCKETS = text(
    "INSERT INTO stage_buckets AS b (tenant, journey, stage, minute, touchpoint, channel, "
    + ", ".join(_BUCKET_SUMS)
    + ", gap_histogram) SELECT :tenant, journey, stage, minute, touchpoint, channel, "
    + ", ".join(_BUCKET_SUMS)
    + ", CAST(histogram AS bigint[]) FROM unnest(CAST(:journey AS text[]), CAST(:stage AS text[]), "
    "CAST(:minute AS timestamptz[]), CAST(:touchpoint AS text[]), CAST(:channel AS text[]), "
    + ", ".join(f"CAST(:{name} AS {_BUCKET_TYPES.get(name, 'double precision')}[])" for name in _BUCKET_SUMS)
    + ", CAST(:histogram AS text[])) AS u(journey, stage, minute, touchpoint, channel, "
    + ", ".join(_BUCKET_SUMS)
    + ", histogram) ON CONFLICT (tenant, journey, stage, minute, touchpoint, channel) DO UPDATE SET "
    + ", ".join(f"{name} = b.{name} + EXCLUDED.{name}" for name in _BUCKET_SUMS)
    + ", gap_histogram = (SELECT array_agg(x + y ORDER BY i) FROM "
    "unnest(b.gap_histogram, EXCLUDED.gap_histogram) WITH ORDINALITY AS h(x, y, i))"
)


async def _add_stage_buckets(conn: AsyncConnection, tenant: str, events: list[ScoredEvent]) -> None:
    # Sorted by key: consumers of other partitions update the same buckets; one lock order
    # for everyone keeps them from deadlocking.
    buckets = sorted(bucket_events(events).items())
    columns: dict[str, list] = defaultdict(list)
    for (journey, stage, touchpoint, channel, minute_s), bucket in buckets:
        columns["journey"].append(journey)
        columns["stage"].append(stage)
        columns["minute"].append(from_epoch_seconds(minute_s))
        columns["touchpoint"].append(touchpoint)
        columns["channel"].append(channel)
        for name in _BUCKET_SUMS:
            columns[name].append(getattr(bucket, name))
        columns["histogram"].append("{" + ",".join(map(str, bucket.gap_histogram)) + "}")
    await conn.execute(_ADD_STAGE_BUCKETS, {"tenant": tenant, **columns})


async def _merge_customer_stages(
    conn: AsyncConnection,
    tenant: str,
    deltas: dict[tuple[str, str, str], CustomerStageState],
    half_lives: HalfLives,
) -> None:
    keys = sorted(deltas)
    rows = await conn.execute(
        text(
            "SELECT s.customer_id, s.journey, s.stage, s.last_event_at, s.gap_sum, s.weight_sum, s.events "
            "FROM customer_stages s JOIN unnest(CAST(:customers AS text[]), CAST(:journeys AS text[]), "
            "CAST(:stages AS text[])) AS k(customer_id, journey, stage) "
            "ON s.customer_id = k.customer_id AND s.journey = k.journey AND s.stage = k.stage "
            "WHERE s.tenant = :tenant ORDER BY 1, 2, 3 FOR UPDATE OF s"
        ),
        {
            "tenant": tenant,
            "customers": [key[0] for key in keys],
            "journeys": [key[1] for key in keys],
            "stages": [key[2] for key in keys],
        },
    )
    merged = dict(deltas)
    for row in rows:
        key = (row.customer_id, row.journey, row.stage)
        stored = CustomerStageState(row.last_event_at.timestamp(), row.gap_sum, row.weight_sum, row.events)
        merged[key] = stored.merge(deltas[key], half_lives.index_s)
    await conn.execute(
        text(
            "INSERT INTO customer_stages (tenant, customer_id, journey, stage, last_event_at, gap_sum, "
            "weight_sum, events) SELECT :tenant, * FROM unnest(CAST(:customers AS text[]), "
            "CAST(:journeys AS text[]), CAST(:stages AS text[]), CAST(:last AS timestamptz[]), "
            "CAST(:gap_sum AS double precision[]), CAST(:weight_sum AS double precision[]), "
            "CAST(:events AS bigint[])) "
            "ON CONFLICT (tenant, customer_id, journey, stage) DO UPDATE SET "
            "last_event_at = EXCLUDED.last_event_at, gap_sum = EXCLUDED.gap_sum, "
            "weight_sum = EXCLUDED.weight_sum, events = EXCLUDED.events"
        ),
        {
            "tenant": tenant,
            "customers": [key[0] for key in keys],
            "journeys": [key[1] for key in keys],
            "stages": [key[2] for key in keys],
            "last": [from_epoch_seconds(merged[key].ref_s) for key in keys],
            "gap_sum": [merged[key].gap_sum for key in keys],
            "weight_sum": [merged[key].weight_sum for key in keys],
            "events": [merged[key].events for key in keys],
        },
    )


_CUSTOMER_COLUMNS = (
    "customer_id", "last_event_at", "first_event_at", "latest_journey", "latest_event_id", "index_gap_sum",
    "index_weight_sum", "trend_gap_sum", "trend_weight_sum", "revenue_sum", "events", "experience_index",
    "trend", "revenue_rank", "quadrant",
)  # fmt: skip
_CUSTOMER_TYPES = (
    "text", "timestamptz", "timestamptz", "text", "text", "double precision", "double precision",
    "double precision", "double precision", "double precision", "bigint", "double precision",
    "double precision", "double precision", "text",
)  # fmt: skip

_UPSERT_CUSTOMERS = text(
    "INSERT INTO customers (tenant, " + ", ".join(_CUSTOMER_COLUMNS) + ", updated_at) "
    "SELECT :tenant, *, now() FROM unnest("
    + ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in zip(_CUSTOMER_COLUMNS, _CUSTOMER_TYPES))
    + ") ON CONFLICT (tenant, customer_id) DO UPDATE SET "
    + ", ".join(f"{name} = EXCLUDED.{name}" for name in _CUSTOMER_COLUMNS[1:])
    + ", updated_at = now()"
)


CUSTOMER_STATE_COLUMNS = (
    "customer_id, last_event_at, first_event_at, latest_journey, latest_event_id, index_gap_sum, "
    "index_weight_sum, trend_gap_sum, trend_weight_sum, revenue_sum, events, quadrant"
)


def customer_state_from_row(row) -> CustomerState:
    """A customers row (CUSTOMER_STATE_COLUMNS) as the pure state it stores."""
    return CustomerState(
        ref_s=row.last_event_at.timestamp(),
        index_gap_sum=row.index_gap_sum,
        index_weight_sum=row.index_weight_sum,
        trend_gap_sum=row.trend_gap_sum,
        trend_weight_sum=row.trend_weight_sum,
        revenue_sum=row.revenue_sum,
        events=row.events,
        first_event_s=row.first_event_at.timestamp(),
        latest_journey=row.latest_journey,
        latest_event_id=row.latest_event_id,
    )


async def _merge_customers(
    conn: AsyncConnection,
    tenant: str,
    deltas: dict[str, CustomerState],
    context: ScoringContext,
    now: datetime,
    outcome: BatchOutcome,
) -> None:
    ids = sorted(deltas)
    rows = await conn.execute(
        text(
            f"SELECT {CUSTOMER_STATE_COLUMNS} "
            "FROM customers WHERE tenant = :tenant AND customer_id = ANY(CAST(:ids AS text[])) "
            "ORDER BY customer_id FOR UPDATE"
        ),
        {"tenant": tenant, "ids": ids},
    )
    merged = dict(deltas)
    previous_quadrants: dict[str, str] = {}
    for row in rows:
        stored = customer_state_from_row(row)
        merged[row.customer_id] = stored.merge(deltas[row.customer_id], context.half_lives)
        previous_quadrants[row.customer_id] = row.quadrant

    now_s = now.timestamp()
    columns: dict[str, list] = defaultdict(list)
    for customer_id in ids:
        state = merged[customer_id]
        journey = context.journeys.of(tenant).get(state.latest_journey)
        revenue = state.revenue_at(now_s, context.half_lives.revenue_s)
        index = state.experience_index
        current = (
            quadrant(index, revenue, journey.experience_threshold, journey.revenue_threshold)
            if journey is not None
            else previous_quadrants.get(customer_id, "disengaged")
        )
        values = {
            "customer_id": customer_id,
            "last_event_at": from_epoch_seconds(state.ref_s),
            "first_event_at": from_epoch_seconds(state.first_event_s),
            "latest_journey": state.latest_journey,
            "latest_event_id": state.latest_event_id,
            "index_gap_sum": state.index_gap_sum,
            "index_weight_sum": state.index_weight_sum,
            "trend_gap_sum": state.trend_gap_sum,
            "trend_weight_sum": state.trend_weight_sum,
            "revenue_sum": state.revenue_sum,
            "events": state.events,
            "experience_index": index,
            "trend": state.trend,
            "revenue_rank": revenue_rank(state.revenue_sum, state.ref_s, context.half_lives.revenue_s),
            "quadrant": current,
        }
        for name in _CUSTOMER_COLUMNS:
            columns[name].append(values[name])
        outcome.customers[(tenant, customer_id)] = state
        outcome.quadrants[(tenant, customer_id)] = current
        previous = previous_quadrants.get(customer_id)
        if previous != current:
            outcome.quadrant_changes.append(
                QuadrantChange(tenant, customer_id, previous, current, index, revenue, state.latest_journey)
            )
    await conn.execute(_UPSERT_CUSTOMERS, {"tenant": tenant, **columns})


async def _store_offsets(conn: AsyncConnection, group_id: str, ranges: list[PartitionRange]) -> None:
    if not ranges:
        return
    result = await conn.execute(
        text(
            "UPDATE consumer_offsets o SET next_offset = u.next_offset, updated_at = now() "
            "FROM unnest(CAST(:topics AS text[]), CAST(:partitions AS integer[]), "
            "CAST(:expected AS bigint[]), CAST(:next AS bigint[])) AS u(topic, partition, expected, next_offset) "
            "WHERE o.group_id = :group_id AND o.topic = u.topic AND o.partition = u.partition "
            "AND o.next_offset IS NOT DISTINCT FROM u.expected"
        ),
        {
            "group_id": group_id,
            "topics": [item.topic for item in ranges],
            "partitions": [item.partition for item in ranges],
            "expected": [item.expected_next_offset for item in ranges],
            "next": [item.next_offset for item in ranges],
        },
    )
    if result.rowcount != len(ranges):
        raise StaleOffsets(
            f"stored offsets moved for {group_id}: expected {[(r.partition, r.expected_next_offset) for r in ranges]}"
        )
