"""Kafka producer and consumer factories, topic names and creation, and record keys."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.core.settings import Settings

log = logging.getLogger(__name__)

TOUCHPOINT_SCHEMA_HEADER = ("schema", b"touchpoint.v1")
ALERT_SCHEMA_HEADER = ("schema", b"alert.v1")


def touchpoint_key(tenant: str, customer_id: str) -> bytes:
    """A customer's events share a key, so they stay in one partition, in order."""
    return f"{tenant}:{customer_id}".encode()


def create_producer(settings: Settings, **overrides) -> AIOKafkaProducer:
    options = dict(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id="cem",
        acks="all",
        enable_idempotence=settings.producer_idempotence,
        linger_ms=settings.producer_linger_ms,
        compression_type=settings.producer_compression,
        request_timeout_ms=int(settings.producer_timeout_s * 1000),
        # Bounds the time a send may wait for metadata or buffer space, so an outage fails fast.
        max_batch_size=256 * 1024,
        retry_backoff_ms=100,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def create_consumer(settings: Settings, **overrides) -> AIOKafkaConsumer:
    options = dict(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id="cem-scoring",
        group_id=settings.scoring_group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=settings.scoring_max_batch,
        fetch_max_wait_ms=settings.scoring_fetch_max_wait_ms,
        session_timeout_ms=settings.scoring_session_timeout_ms,
        rebalance_timeout_ms=settings.scoring_rebalance_timeout_ms,
        heartbeat_interval_ms=min(1_000, settings.scoring_session_timeout_ms // 3),
    )
    options.update(overrides)
    return AIOKafkaConsumer(**options)


async def ensure_topics(settings: Settings) -> None:
    """Create the service's topics if they do not exist (idempotent; production may pre-create them)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, client_id="cem-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [settings.touchpoints_topic, settings.dlq_topic, settings.alerts_topic]
        missing = [
            NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=1)
            for name in wanted
            if name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
                log.info("created topics %s", [topic.name for topic in missing])
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
