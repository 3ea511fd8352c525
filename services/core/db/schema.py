"""The Postgres tables (SQLAlchemy Core). Every key starts with the tenant."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    column,
    func,
    table,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = MetaData()


def _timestamp(name: str, **kwargs) -> Column:
    return Column(name, DateTime(timezone=True), **kwargs)


# (tenant, event_id) of every event scored: the de-duplication ledger.
processed_events = Table(
    "processed_events",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    _timestamp("occurred_at", nullable=False),
    _timestamp("scored_at", nullable=False, server_default=func.now()),
    # blake2b-128 of the event's content: a retry matches it, a different event under the same id does not.
    Column("payload_hash", LargeBinary, nullable=True),
    PrimaryKeyConstraint("tenant", "event_id"),
    # Finds the expired rows for services/scoring/retention.py (migration 0009: why not BRIN).
    Index("processed_events_scored_at", "scored_at"),
)

# Kafka offsets, stored in the same transaction as the aggregates they produced.
consumer_offsets = Table(
    "consumer_offsets",
    metadata,
    Column("group_id", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=True),  # NULL: nothing consumed yet
    _timestamp("updated_at", nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("group_id", "topic", "partition"),
)

# Minute buckets per (journey, stage, touchpoint, channel); '' stands for "not given".
stage_buckets = Table(
    "stage_buckets",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("journey", Text, nullable=False),
    Column("stage", Text, nullable=False),
    _timestamp("minute", nullable=False),
    Column("touchpoint", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("events", BigInteger, nullable=False),
    Column("expectation_sum", Double, nullable=False),
    Column("expectation_sq_sum", Double, nullable=False),
    Column("experience_sum", Double, nullable=False),
    Column("experience_sq_sum", Double, nullable=False),
    Column("gap_sum", Double, nullable=False),
    Column("gap_sq_sum", Double, nullable=False),
    Column("shortfall_events", BigInteger, nullable=False),
    Column("promise_kept_events", BigInteger, nullable=False),
    Column("negative_emotion_events", BigInteger, nullable=False),
    Column("revenue_sum", Double, nullable=False),
    Column("gap_histogram", ARRAY(BigInteger), nullable=False),
    PrimaryKeyConstraint("tenant", "journey", "stage", "minute", "touchpoint", "channel"),
)


def _stage_bucket_rollup(name: str, period: str) -> Table:
    """The stage buckets summed per UTC `period` (migration 0006: kept by triggers on stage_buckets)."""
    columns = [
        _timestamp(period, nullable=False) if column.name == "minute" else Column(column.name, column.type, nullable=False)
        for column in stage_buckets.columns
    ]
    return Table(
        name, metadata, *columns, PrimaryKeyConstraint("tenant", "journey", "stage", period, "touchpoint", "channel")
    )


stage_buckets_hourly = _stage_bucket_rollup("stage_buckets_hourly", "hour")
stage_buckets_daily = _stage_bucket_rollup("stage_buckets_daily", "day")

customer_stages = Table(
    "customer_stages",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("customer_id", Text, nullable=False),
    Column("journey", Text, nullable=False),
    Column("stage", Text, nullable=False),
    _timestamp("last_event_at", nullable=False),  # the reference time of the decayed sums
    Column("gap_sum", Double, nullable=False),
    Column("weight_sum", Double, nullable=False),
    Column("events", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant", "customer_id", "journey", "stage"),
    # Room on every page for scoring's updates to stay HOT (migration 0010).
    postgresql_with={"fillfactor": 90},
)

customers = Table(
    "customers",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("customer_id", Text, nullable=False),
    _timestamp("last_event_at", nullable=False),  # the reference time of the decayed sums
    _timestamp("first_event_at", nullable=False),
    Column("latest_journey", Text, nullable=False),
    Column("latest_event_id", Text, nullable=False),
    Column("index_gap_sum", Double, nullable=False),
    Column("index_weight_sum", Double, nullable=False),
    Column("trend_gap_sum", Double, nullable=False),
    Column("trend_weight_sum", Double, nullable=False),
    Column("revenue_sum", Double, nullable=False),
    Column("events", BigInteger, nullable=False),
    # Derived at scoring time, stored so that lists filter and sort on an index.
    Column("experience_index", Double, nullable=False),
    Column("trend", Double, nullable=False),
    Column("revenue_rank", Double, nullable=False),
    Column("quadrant", Text, nullable=False),
    _timestamp("updated_at", nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant", "customer_id"),
    Index("customers_quadrant_revenue", "tenant", "quadrant", text("revenue_rank DESC"), "customer_id"),
    Index("customers_revenue", "tenant", text("revenue_rank DESC"), "customer_id"),
    Index("customers_experience_index", "tenant", "experience_index", "customer_id"),
    Index("customers_last_event", "tenant", "last_event_at", "customer_id"),
)

# The positioning map's totals per (tenant, latest journey, quadrant, revenue band), kept by
# statement triggers on customers (migrations 0007 and 0011), so the map reads a handful of rows.
# The triggers append each statement's changes to quadrant_total_deltas, folded into the totals
# by whichever writer is not waiting for another to fold; read quadrant_totals_live, which adds
# the deltas not folded yet. A customer
# adds round(2 ** (revenue_rank - 16 * band + 46)) to the band floor(revenue_rank / 16), so a band
# is worth revenue_units * 2 ** (16 * band - 46 - now / revenue_half_life) at `now`, and
# round(experience_index * 2 ** 40) to index_units (services/core/revenue.py). Integer sums:
# removing a customer subtracts exactly what adding it added, nothing drifts.
quadrant_totals = Table(
    "quadrant_totals",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("latest_journey", Text, nullable=False),
    Column("quadrant", Text, nullable=False),
    Column("band", BigInteger, nullable=False),
    Column("customers", BigInteger, nullable=False),
    Column("index_units", Numeric, nullable=False),
    Column("revenue_units", Numeric, nullable=False),
    PrimaryKeyConstraint("tenant", "latest_journey", "quadrant", "band"),
)
# A view (migration 0011): quadrant_totals plus quadrant_total_deltas, summed per band.
quadrant_totals_live = table(
    "quadrant_totals_live", *(column(item.name, item.type) for item in quadrant_totals.c)
)


# Alerts (SPEC 7). At most one alert per (tenant, kind, subject) is not resolved: the partial
# unique index. Subjects: a customer id (customer_at_risk, customer_hot), 'journey/stage'
# (stage_shortfall).
alerts = Table(
    "alerts",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("id", UUID(as_uuid=True), nullable=False),
    Column("kind", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("journey", Text, nullable=False),
    Column("severity", Text, nullable=False),
    Column("status", Text, nullable=False),  # open | acknowledged | resolved
    _timestamp("opened_at", nullable=False),
    _timestamp("updated_at", nullable=False),
    _timestamp("acknowledged_at", nullable=True),
    _timestamp("resolved_at", nullable=True),
    Column("revenue_at_stake", Double, nullable=False),
    Column("evidence", JSONB, nullable=False),
    Column("acknowledged_by", Text, nullable=True),
    Column("resolved_by", Text, nullable=True),  # NULL when resolved automatically
    Column("note", Text, nullable=True),
    PrimaryKeyConstraint("tenant", "id"),
    Index(
        "alerts_one_unresolved_per_subject",
        "tenant",
        "kind",
        "subject",
        unique=True,
        postgresql_where=text("status <> 'resolved'"),
    ),
    Index("alerts_opened", "tenant", text("opened_at DESC"), "id"),
    Index("alerts_revenue_at_stake", "tenant", text("revenue_at_stake DESC"), "id"),
    Index("alerts_subject", "tenant", "subject"),
)

# The append-only log of alert status changes. `seq` is the Server-Sent Events id and the outbox
# position; writers take one transaction-scoped advisory lock before inserting, so transitions
# commit in seq order and a reader that saw seq n has seen every seq below it.
alert_transitions = Table(
    "alert_transitions",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=True),
    Column("tenant", Text, nullable=False),
    Column("alert_id", UUID(as_uuid=True), nullable=False),
    Column("kind", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("from_status", Text, nullable=True),  # NULL: the alert was opened
    Column("to_status", Text, nullable=False),
    _timestamp("at", nullable=False),
    Column("payload", JSONB, nullable=False),  # the alert after the transition, and why
    Index("alert_transitions_tenant_seq", "tenant", "seq"),
)

# How far each outbox relay (the Kafka topic, a webhook) has delivered alert_transitions.
alert_outbox_positions = Table(
    "alert_outbox_positions",
    metadata,
    Column("relay", Text, primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
    _timestamp("updated_at", nullable=False, server_default=func.now()),
)

# API keys (docs/security.md): the tenant and the scopes a caller has. `hash` is
# HMAC-SHA256(pepper, key); the key itself is shown once, at creation, and stored nowhere.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("prefix", Text, nullable=False),  # the public handle: cem_<prefix>_...
    Column("hash", LargeBinary, nullable=False),
    Column("scopes", ARRAY(Text), nullable=False),
    _timestamp("created_at", nullable=False, server_default=func.now()),
    _timestamp("revoked_at", nullable=True),
    _timestamp("last_used_at", nullable=True),  # as of the last cache miss: within auth_cache_ttl_s
    Index("api_keys_prefix", "prefix", unique=True),
    Index("api_keys_tenant", "tenant", "created_at"),
)

# Per-tenant journey maps (SPEC 2), append-only: a change is a new version, a retirement a version
# without a document. Events carry the promise and weight they were scored with, so a new version
# never rewrites history.
tenant_journeys = Table(
    "tenant_journeys",
    metadata,
    Column("tenant", Text, primary_key=True),
    Column("journey", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("document", JSONB, nullable=True),
    _timestamp("created_at", nullable=False, server_default=func.now()),
    Column("created_by", Text, nullable=True),
    CheckConstraint("version >= 1", name="tenant_journeys_version_positive"),
)
