"""One scoring batch as one Postgres transaction: de-duplicate, fold into the aggregates, store
the consumed offsets (compare-and-set, so a consumer that lost its partition cannot commit).

The batch reaches Postgres once per table: the de-duplicated events' keys and the per-key deltas
(the pure maths of services.core.scoring) are COPYed into session-local staging tables, and one
set-based upsert per table folds them into the stored state. The decayed merge of a delta into a
stored row (CustomerState.merge, CustomerStageState.merge) is written in SQL inside the upsert
(ON CONFLICT DO UPDATE works on the locked, latest row version), so no row is read first;
RETURNING OLD/NEW gives the previous quadrant for the alerts, and only the customers that the
alerts look at come back (most rows of a batch at a million customers are none of theirs)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import TypeVar

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.core.alerting import HOT_GAP
from services.core.journeys import JourneyCatalog
from services.core.scoring import (
    CustomerState,
    HalfLives,
    ScoredEvent,
    bucket_events,
    merge_customer_events,
)


T = TypeVar("T")
U = TypeVar("U")


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
    # The stored state and quadrant of the batch's customers that the alerts judge: those now in
    # at_risk, those whose quadrant changed (new customers included), and those with an event at
    # or below alerting.HOT_GAP. The other customers of the batch are not in them.
    customers: dict[tuple[str, str], CustomerState] = field(default_factory=dict)
    quadrants: dict[tuple[str, str], str] = field(default_factory=dict)
    # The instant revenue was valued at.
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


# --------------------------------------------------------------------------------------------
# The batch's connection: asyncpg under the caller's SQLAlchemy connection, in its transaction.

_BUCKET_SUMS = (
    "events", "expectation_sum", "expectation_sq_sum", "experience_sum", "experience_sq_sum", "gap_sum",
    "gap_sq_sum", "shortfall_events", "promise_kept_events", "negative_emotion_events", "revenue_sum",
)  # fmt: skip
_BUCKET_INTEGERS = {"events", "shortfall_events", "promise_kept_events", "negative_emotion_events"}
_CUSTOMER_SUMS = (
    "index_gap_sum", "index_weight_sum", "trend_gap_sum", "trend_weight_sum", "revenue_sum",
)  # fmt: skip

# Times travel as epoch seconds (to_timestamp on the way in: exact for the microsecond times of
# events), which spares a datetime per value. ON COMMIT DELETE ROWS: temp tables are never
# vacuumed, so each commit empties them; each statement also deletes what it read, so that two
# batches in one transaction cannot see each other's rows.
_STAGING = {
    "scoring_claims": "tenant text, event_id text, occurred_s float8, payload_hash bytea",
    "scoring_buckets": "tenant text, journey text, stage text, minute_s float8, touchpoint text, channel text, "
    + ", ".join(f"{name} {'bigint' if name in _BUCKET_INTEGERS else 'float8'}" for name in _BUCKET_SUMS)
    + ", gap_histogram text",  # as text: asyncpg encodes an int array element by element, slowly
    "scoring_customer_stages": "tenant text, customer_id text, journey text, stage text, last_s float8, "
    "gap_sum float8, weight_sum float8, events bigint",
    "scoring_customers": "tenant text, customer_id text, last_s float8, first_s float8, latest_journey text, "
    "latest_event_id text, " + ", ".join(f"{name} float8" for name in _CUSTOMER_SUMS) + ", events bigint",
}
# One statement through SQLAlchemy: it also opens the caller's transaction (SQLAlchemy begins on
# a connection's first statement), which the statements sent to asyncpg directly then run in.
_CREATE_STAGING = text(
    "DO $$ BEGIN IF to_regclass('pg_temp.scoring_customers') IS NULL THEN "
    + " ".join(f"CREATE TEMP TABLE {name} ({columns}) ON COMMIT DELETE ROWS;" for name, columns in _STAGING.items())
    + " END IF; END $$"
)


@contextlib.contextmanager
def _as_dbapi_error(statement: str) -> Iterator[None]:
    """asyncpg's errors as SQLAlchemy's, as if the statement had gone through SQLAlchemy: the
    consumer tells refused data (SQLSTATE of error.orig) from outages by them."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DBAPIError.instance(statement, None, error, Exception, hide_parameters=True) from error


class _Batch:
    """The asyncpg connection under the caller's: COPY and the hot statements skip SQLAlchemy's
    text() layer and asyncpg's per-element array encoding (a quarter of the process before)."""

    def __init__(self, driver: asyncpg.Connection):
        self.driver = driver

    @classmethod
    async def open(cls, conn: AsyncConnection) -> _Batch:
        await conn.execute(_CREATE_STAGING)
        driver = (await conn.get_raw_connection()).driver_connection
        if not driver.is_in_transaction():  # would autocommit statement by statement
            raise RuntimeError("score_batch runs in the caller's transaction")
        return cls(driver)

    async def stage(self, table: str, records: list[tuple]) -> None:
        columns = [column.split()[0] for column in _STAGING[table].split(", ")]
        with _as_dbapi_error(f"COPY pg_temp.{table}"):
            await self.driver.copy_records_to_table(table, records=records, columns=columns, schema_name="pg_temp")

    async def fetch(self, statement: str, *args) -> list[asyncpg.Record]:
        with _as_dbapi_error(statement):
            return await self.driver.fetch(statement, *args)

    async def execute(self, statement: str, *args) -> int:
        """The number of rows the statement touched."""
        with _as_dbapi_error(statement):
            status = await self.driver.execute(statement, *args)
        return int(status.rsplit(" ", 1)[-1])


async def score_batch(
    conn: AsyncConnection,
    events: list[TenantEvent],
    ranges: list[PartitionRange],
    context: ScoringContext,
    now: datetime,
) -> BatchOutcome:
    """Apply one batch inside the caller's transaction. Raises StaleOffsets if fenced off.

    The rows that other replicas of a tenant write too come last: the current minutes' stage
    buckets with their roll-ups, behind the tenant's bucket lock (BUCKETS_LOCK_CLASS). Their
    locks are held until the commit, so the shorter the rest of the transaction after them, the
    less the replicas queue on each other. The customers' quadrant totals are shared too, but
    their triggers only append deltas and fold them when no one else is folding (migration 0011):
    no replica waits there.

    The pure work overlaps Postgres': the customer and customer-stage rows are computed while
    Postgres claims the events, the stage-bucket rows while it merges the customer stages. They
    are computed for every event of the batch, as if all were new (the usual case), and again
    for the new ones if some were seen before."""
    outcome = BatchOutcome(now=now)
    batch = await _Batch.open(conn)
    unique, outcome.conflicting = _first_of_each_id(events)
    by_tenant = _by_tenant(unique.values())
    fresh: list[TenantEvent] = []
    if unique:
        # The ledger keeps the first copy of each id: the ids claimed now are the new events.
        await batch.stage(
            "scoring_claims",
            [(tenant, event_id, item.event.occurred_s, item.payload_hash) for (tenant, event_id), item in unique.items()],
        )
        claimed_rows, (stage_rows, customer_rows) = await _meanwhile(
            batch.fetch(_CLAIM), lambda: _state_rows(by_tenant, context.half_lives)
        )
        claimed = {(row["tenant"], row["event_id"]) for row in claimed_rows}
        fresh = [item for key, item in unique.items() if key in claimed]
        outcome.conflicting += await _conflicts_with_stored(batch, unique, claimed)
    outcome.duplicates = len(events) - len(fresh)
    outcome.scored = fresh
    if fresh:
        if len(fresh) < len(unique):
            by_tenant = _by_tenant(fresh)
            stage_rows, customer_rows = _state_rows(by_tenant, context.half_lives)
        await batch.stage("scoring_customer_stages", stage_rows)
        _, bucket_rows = await _meanwhile(
            batch.execute(_MERGE_CUSTOMER_STAGES, context.half_lives.index_s), lambda: _bucket_rows(by_tenant)
        )
        hot = {(item.tenant, item.event.customer_id) for item in fresh if item.event.gap <= HOT_GAP}
        await _merge_customers(batch, customer_rows, by_tenant.keys(), hot, context, now, outcome)
        await batch.stage("scoring_buckets", bucket_rows)
        await batch.execute(_LOCK_TENANTS_BUCKETS, BUCKETS_LOCK_CLASS, list(by_tenant))
        await batch.execute(_ADD_STAGE_BUCKETS)

    await _store_offsets(batch, context.group_id, ranges)
    return outcome


async def _meanwhile(statement: Awaitable[T], compute: Callable[[], U]) -> tuple[T, U]:
    """Send `statement`, run `compute` while Postgres works on it, then wait for the statement.

    One step of the event loop sends it (asyncpg writes a prepared statement's execution at once).
    The connection is not touched again until the statement is done, even if `compute` raises."""
    running = asyncio.ensure_future(statement)
    await asyncio.sleep(0)
    try:
        computed = compute()
    finally:
        result = await running
    return result, computed


# --------------------------------------------------------------------------------------------
# De-duplication.

_CLAIM = (
    "WITH staged AS (DELETE FROM pg_temp.scoring_claims RETURNING *) "
    "INSERT INTO processed_events (tenant, event_id, occurred_at, payload_hash) "
    "SELECT tenant, event_id, to_timestamp(occurred_s), payload_hash FROM staged ORDER BY tenant, event_id "
    "ON CONFLICT DO NOTHING RETURNING tenant, event_id"
)
_STORED_HASHES = (
    "SELECT p.tenant, p.event_id, p.payload_hash FROM processed_events p "
    "JOIN unnest($1::text[], $2::text[]) AS k(tenant, event_id) ON p.tenant = k.tenant AND p.event_id = k.event_id"
)


def _first_of_each_id(events: list[TenantEvent]) -> tuple[dict[tuple[str, str], TenantEvent], int]:
    """The first event of each (tenant, event_id) in the batch, and how many of the others carried
    a payload different from it: a client that reused an event id for another event (ignored,
    but counted so that someone looks)."""
    unique: dict[tuple[str, str], TenantEvent] = {}
    conflicting = 0
    for item in events:
        key = (item.tenant, item.event.event_id)
        first = unique.setdefault(key, item)
        if first is not item and _differ(first.payload_hash, item.payload_hash):
            conflicting += 1
    return unique, conflicting


async def _conflicts_with_stored(
    batch: _Batch, unique: dict[tuple[str, str], TenantEvent], claimed: set[tuple[str, str]]
) -> int:
    """How many of the batch's events seen before carried a payload different from the one scored."""
    seen_before = [key for key in unique if key not in claimed]
    if not seen_before:
        return 0
    # A separate statement: it sees rows committed by other consumers since the claim began.
    stored = await batch.fetch(_STORED_HASHES, [key[0] for key in seen_before], [key[1] for key in seen_before])
    return sum(_differ(row["payload_hash"], unique[(row["tenant"], row["event_id"])].payload_hash) for row in stored)


def _differ(kept: bytes | None, other: bytes | None) -> bool:
    # Rows scored before payload hashes existed have none: no evidence of a conflict.
    return kept is not None and other is not None and bytes(kept) != bytes(other)


# --------------------------------------------------------------------------------------------
# Stage buckets: plain sums.

# pg_advisory_xact_lock(class, hashtext(tenant)): 'CSB', apart from the other classes. The minute
# upsert locks its rows in one order, but it fires two roll-up triggers (migration 0006: the
# inserted rows', then the updated rows'), each locking hour and day rows in order, not in one
# order together: two batches of a tenant could each hold a roll-up row the other's second trigger
# wants. Taken first, in tenant order, and held to the commit, this lock makes them queue instead.
# The batch's alerts come after it, so a tenant's stage alerts are judged one batch at a time.
BUCKETS_LOCK_CLASS = 0x435342
_LOCK_TENANTS_BUCKETS = (
    "SELECT pg_advisory_xact_lock($1, hashtext(tenant)) "
    "FROM (SELECT DISTINCT tenant FROM unnest($2::text[]) AS tenant ORDER BY tenant) AS t"
)
_HISTOGRAM_BINS = 40
# Element by element: an unnest/array_agg per conflicting row cost more than the rest of the upsert.
_ADD_HISTOGRAMS = (
    "ARRAY["
    + ", ".join(f"b.gap_histogram[{i}] + EXCLUDED.gap_histogram[{i}]" for i in range(1, _HISTOGRAM_BINS + 1))
    + "]"
)
_ADD_STAGE_BUCKETS = (
    "WITH staged AS (DELETE FROM pg_temp.scoring_buckets RETURNING *) "
    "INSERT INTO stage_buckets AS b (tenant, journey, stage, minute, touchpoint, channel, "
    + ", ".join(_BUCKET_SUMS)
    + ", gap_histogram) SELECT tenant, journey, stage, to_timestamp(minute_s), touchpoint, channel, "
    + ", ".join(_BUCKET_SUMS)
    # Consumers of other partitions update the same buckets: one lock order for all of them.
    + ", gap_histogram::bigint[] FROM staged ORDER BY tenant, journey, stage, touchpoint, channel, minute_s "
    "ON CONFLICT (tenant, journey, stage, minute, touchpoint, channel) DO UPDATE SET "
    + ", ".join(f"{name} = b.{name} + EXCLUDED.{name}" for name in _BUCKET_SUMS)
    + f", gap_histogram = {_ADD_HISTOGRAMS}"
)


def _by_tenant(events: Iterable[TenantEvent]) -> dict[str, list[ScoredEvent]]:
    grouped: dict[str, list[ScoredEvent]] = defaultdict(list)
    for item in events:
        grouped[item.tenant].append(item.event)
    return grouped


def _bucket_rows(by_tenant: dict[str, list[ScoredEvent]]) -> list[tuple]:
    """The batch's minute buckets as scoring_buckets rows."""
    return [
        (tenant, journey, stage, minute_s, touchpoint, channel)
        + tuple(getattr(bucket, name) for name in _BUCKET_SUMS)
        + (_histogram_text(tuple(bucket.gap_histogram)),)
        for tenant, tenant_events in by_tenant.items()
        for (journey, stage, touchpoint, channel, minute_s), bucket in bucket_events(tenant_events).items()
    ]


@lru_cache(maxsize=4096)
def _histogram_text(histogram: tuple[int, ...]) -> str:
    """A histogram as a Postgres array literal. Most buckets of a batch hold one or two events, so
    a few histograms recur: formatting 40 integers for each row was 10.8 % of the process's
    samples in py-spy."""
    return "{" + ",".join(map(str, histogram)) + "}"


# --------------------------------------------------------------------------------------------
# Decayed states, merged in SQL as in services.core.scoring.


def _decay(from_time: str, to_time: str, half_life: str) -> str:
    """decay_factor() in SQL: the same float operations on the same epoch seconds. Postgres
    raises an error where Python's power underflows to 0, so a factor below the smallest normal
    float (2 ** -1022, where Python's are subnormal) is 0. date_part, not extract: the same
    float8 (both correctly rounded from the microseconds), without extract's numeric."""
    exponent = f"(date_part('epoch', {from_time}) - date_part('epoch', {to_time})) / {half_life}"
    return f"CASE WHEN {exponent} < -1022 THEN 0 ELSE power(2::float8, {exponent}) END"


# CustomerStageState.merge(stored s, delta EXCLUDED); $1 is the customer half-life.
_MERGE_CUSTOMER_STAGES = (
    "WITH staged AS (DELETE FROM pg_temp.scoring_customer_stages RETURNING *) "
    "INSERT INTO customer_stages AS s "
    "(tenant, customer_id, journey, stage, last_event_at, gap_sum, weight_sum, events) "
    "SELECT tenant, customer_id, journey, stage, to_timestamp(last_s), gap_sum, weight_sum, events FROM staged "
    "ORDER BY tenant, customer_id, journey, stage "
    "ON CONFLICT (tenant, customer_id, journey, stage) DO UPDATE SET "
    "(last_event_at, gap_sum, weight_sum, events) = ("
    "SELECT r.ref, s.gap_sum * f.mine + EXCLUDED.gap_sum * f.theirs, "
    "s.weight_sum * f.mine + EXCLUDED.weight_sum * f.theirs, s.events + EXCLUDED.events "
    "FROM (SELECT greatest(s.last_event_at, EXCLUDED.last_event_at) AS ref OFFSET 0) r CROSS JOIN LATERAL (SELECT "
    f"{_decay('s.last_event_at', 'r.ref', '$1')} AS mine, {_decay('EXCLUDED.last_event_at', 'r.ref', '$1')} AS theirs"
    " OFFSET 0) f)"
)


def _state_rows(
    by_tenant: dict[str, list[ScoredEvent]], half_lives: HalfLives
) -> tuple[list[tuple], list[tuple]]:
    """The batch folded per customer stage and per customer (services.core.scoring's maths), as
    scoring_customer_stages and scoring_customers rows."""
    stage_rows: list[tuple] = []
    customer_rows: list[tuple] = []
    for tenant, tenant_events in by_tenant.items():
        customers, stages = merge_customer_events(tenant_events, half_lives)
        stage_rows += [
            (tenant, customer_id, journey, stage, state.ref_s, state.gap_sum, state.weight_sum, state.events)
            for (customer_id, journey, stage), state in stages.items()
        ]
        customer_rows += [
            (
                tenant, customer_id, state.ref_s, state.first_event_s, state.latest_journey, state.latest_event_id,
                state.index_gap_sum, state.index_weight_sum, state.trend_gap_sum, state.trend_weight_sum,
                state.revenue_sum, state.events,
            )  # fmt: skip
            for customer_id, state in customers.items()
        ]
    return stage_rows, customer_rows


_CUSTOMER_STATE = (
    "last_event_at", "first_event_at", "latest_journey", "latest_event_id", *_CUSTOMER_SUMS, "events",
)  # fmt: skip
_CUSTOMER_DERIVED = ("experience_index", "trend", "revenue_rank", "quadrant", "updated_at")


def _customer_row(merged: str, previous_quadrant: str) -> str:
    """The stored columns from a merged state `m` (_CUSTOMER_STATE columns), as _merge_customers
    computed them in Python: CustomerState.experience_index, trend, revenue_rank() and quadrant()
    with the thresholds of the latest journey (unknown journey: the quadrant stays). Parameters:
    $1-$4 the tenants' journey thresholds, $5 now (epoch seconds), $8 the revenue half-life."""
    return (
        "SELECT " + ", ".join(f"m.{name}" for name in _CUSTOMER_STATE) + ", d.experience_index, "
        "CASE WHEN m.trend_weight_sum > 0 THEN m.trend_gap_sum / m.trend_weight_sum ELSE 0 END - d.experience_index, "
        "CASE WHEN m.revenue_sum > 0 THEN ln(m.revenue_sum) / ln(2::float8) + d.ref_s / $8 ELSE -1e300 END, "
        f"CASE WHEN t.journey IS NULL THEN {previous_quadrant} "
        "WHEN d.experience_index >= t.experience_threshold "
        "THEN CASE WHEN d.revenue >= t.revenue_threshold THEN 'exemplary' ELSE 'growth' END "
        "ELSE CASE WHEN d.revenue >= t.revenue_threshold THEN 'at_risk' ELSE 'disengaged' END END, now() "
        # OFFSET 0 keeps each level a subquery computed once per row: flattened, every reference to
        # a merged column repeated its whole expression (the decays several times over).
        f"FROM ({merged} OFFSET 0) m CROSS JOIN LATERAL (SELECT "
        "CASE WHEN m.index_weight_sum > 0 THEN m.index_gap_sum / m.index_weight_sum ELSE 0 END AS experience_index, "
        "date_part('epoch', m.last_event_at) AS ref_s OFFSET 0) d0 CROSS JOIN LATERAL (SELECT d0.*, "
        "m.revenue_sum * CASE WHEN (d0.ref_s - greatest($5, d0.ref_s)) / $8 < -1022 THEN 0 "
        "ELSE power(2::float8, (d0.ref_s - greatest($5, d0.ref_s)) / $8) END AS revenue OFFSET 0) d "
        "LEFT JOIN thresholds t ON t.tenant = m.tenant AND t.journey = m.latest_journey"
    )


# CustomerState.merge(stored c, delta EXCLUDED): $6, $7, $8 the index, trend and revenue half-lives.
_MERGED_CUSTOMER = (
    "SELECT c.tenant, r.ref AS last_event_at, least(c.first_event_at, EXCLUDED.first_event_at) AS first_event_at, "
    "CASE WHEN r.theirs_latest THEN EXCLUDED.latest_journey ELSE c.latest_journey END AS latest_journey, "
    "CASE WHEN r.theirs_latest THEN EXCLUDED.latest_event_id ELSE c.latest_event_id END AS latest_event_id, "
    + ", ".join(
        f"c.{name} * f.mine_{kind} + EXCLUDED.{name} * f.theirs_{kind} AS {name}"
        for name, kind in zip(_CUSTOMER_SUMS, ("index", "index", "trend", "trend", "revenue"))
    )
    + ", c.events + EXCLUDED.events AS events "
    # The latest journey is that of the greatest (time, event id), event ids compared as Python does.
    "FROM (SELECT greatest(c.last_event_at, EXCLUDED.last_event_at) AS ref, "
    '(EXCLUDED.last_event_at, EXCLUDED.latest_event_id COLLATE "C") '
    '> (c.last_event_at, c.latest_event_id COLLATE "C") '
    "AS theirs_latest OFFSET 0) r CROSS JOIN LATERAL (SELECT "
    + ", ".join(
        f"{_decay('c.last_event_at', 'r.ref', half_life)} AS mine_{kind}, "
        f"{_decay('EXCLUDED.last_event_at', 'r.ref', half_life)} AS theirs_{kind}"
        for kind, half_life in (("index", "$6"), ("trend", "$7"), ("revenue", "$8"))
    )
    + " OFFSET 0) f"
)
# Only the rows that BatchOutcome.customers keeps come back: $9, $10 the (tenant, customer id)
# of the batch's hot events.
_MERGE_CUSTOMERS = (
    "WITH thresholds AS (SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[]) "
    "AS t(tenant, journey, experience_threshold, revenue_threshold)), "
    "staged AS (DELETE FROM pg_temp.scoring_customers RETURNING *), "
    "merged AS (INSERT INTO customers AS c (tenant, customer_id, "
    + ", ".join(_CUSTOMER_STATE + _CUSTOMER_DERIVED)
    + ") "
    "SELECT tenant, customer_id, n.* FROM staged CROSS JOIN LATERAL ("
    + _customer_row(
        "SELECT staged.tenant, to_timestamp(staged.last_s) AS last_event_at, "
        "to_timestamp(staged.first_s) AS first_event_at, staged.latest_journey, staged.latest_event_id, "
        + ", ".join(f"staged.{name}" for name in _CUSTOMER_SUMS)
        + ", staged.events",
        "'disengaged'",
    )
    + ") n ORDER BY tenant, customer_id "
    "ON CONFLICT (tenant, customer_id) DO UPDATE SET (" + ", ".join(_CUSTOMER_STATE + _CUSTOMER_DERIVED) + ") = ("
    + _customer_row(_MERGED_CUSTOMER, "c.quadrant")
    + ") RETURNING old.quadrant AS previous, new.tenant, new.customer_id, new.quadrant, "
    + ", ".join(f"new.{name}" for name in _CUSTOMER_STATE)
    + ") SELECT m.* FROM merged m LEFT JOIN unnest($9::text[], $10::text[]) AS h(tenant, customer_id) "
    "ON h.tenant = m.tenant AND h.customer_id = m.customer_id "
    "WHERE m.quadrant = 'at_risk' OR m.previous IS DISTINCT FROM m.quadrant OR h.customer_id IS NOT NULL"
)

CUSTOMER_STATE_COLUMNS = (
    "customer_id, last_event_at, first_event_at, latest_journey, latest_event_id, index_gap_sum, "
    "index_weight_sum, trend_gap_sum, trend_weight_sum, revenue_sum, events, quadrant"
)


def customer_state_from_row(row) -> CustomerState:
    """A customers row (CUSTOMER_STATE_COLUMNS) as the pure state it stores."""
    return _customer_state(row._mapping)


def _customer_state(values: Mapping) -> CustomerState:
    return CustomerState(
        ref_s=values["last_event_at"].timestamp(),
        index_gap_sum=values["index_gap_sum"],
        index_weight_sum=values["index_weight_sum"],
        trend_gap_sum=values["trend_gap_sum"],
        trend_weight_sum=values["trend_weight_sum"],
        revenue_sum=values["revenue_sum"],
        events=values["events"],
        first_event_s=values["first_event_at"].timestamp(),
        latest_journey=values["latest_journey"],
        latest_event_id=values["latest_event_id"],
    )


async def _merge_customers(
    batch: _Batch,
    records: list[tuple],
    tenants: Iterable[str],
    hot: set[tuple[str, str]],
    context: ScoringContext,
    now: datetime,
    outcome: BatchOutcome,
) -> None:
    thresholds = [
        (tenant, journey_id, journey.experience_threshold, journey.revenue_threshold)
        for tenant in tenants
        for journey_id, journey in context.journeys.of(tenant).items()
    ]
    await batch.stage("scoring_customers", records)
    half_lives = context.half_lives
    rows = await batch.fetch(
        _MERGE_CUSTOMERS,
        *(list(column) for column in zip(*thresholds)) if thresholds else ([], [], [], []),
        now.timestamp(), half_lives.index_s, half_lives.trend_s, half_lives.revenue_s,
        [key[0] for key in hot], [key[1] for key in hot],
    )
    now_s = now.timestamp()
    for row in rows:
        key = (row["tenant"], row["customer_id"])
        state = _customer_state(row)
        outcome.customers[key] = state
        outcome.quadrants[key] = current = row["quadrant"]
        if row["previous"] != current:
            outcome.quadrant_changes.append(
                QuadrantChange(
                    *key, row["previous"], current, state.experience_index,
                    state.revenue_at(now_s, half_lives.revenue_s), state.latest_journey,
                )  # fmt: skip
            )


# --------------------------------------------------------------------------------------------
# Offsets.

_STORE_OFFSETS = (
    "UPDATE consumer_offsets o SET next_offset = u.next_offset, updated_at = now() "
    "FROM unnest($2::text[], $3::integer[], $4::bigint[], $5::bigint[]) AS u(topic, partition, expected, next_offset) "
    "WHERE o.group_id = $1 AND o.topic = u.topic AND o.partition = u.partition "
    "AND o.next_offset IS NOT DISTINCT FROM u.expected"
)


async def _store_offsets(batch: _Batch, group_id: str, ranges: list[PartitionRange]) -> None:
    if not ranges:
        return
    updated = await batch.execute(
        _STORE_OFFSETS,
        group_id,
        [item.topic for item in ranges],
        [item.partition for item in ranges],
        [item.expected_next_offset for item in ranges],
        [item.next_offset for item in ranges],
    )
    if updated != len(ranges):
        raise StaleOffsets(
            f"stored offsets moved for {group_id}: expected {[(r.partition, r.expected_next_offset) for r in ranges]}"
        )
