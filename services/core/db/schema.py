"""The Postgres tables (SQLAlchemy Core). Every key starts with the tenant."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY

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
    PrimaryKeyConstraint("tenant", "event_id"),
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
