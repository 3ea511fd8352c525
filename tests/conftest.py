"""Session fixtures: a real PostgreSQL and a real Kafka-protocol broker on free loopback ports.

They start only when a test asks for them, so `pytest tests/unit` starts no server. Each test
gets its own tenant, topics and consumer group, so tests share the servers without interfering.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from services.core.db.engine import migrate
from services.core.embedded import EmbeddedKafka, EmbeddedPostgres
from services.core.settings import Settings

# The 2-core machine is shared: a per-example deadline measures the neighbours, not the code.
hypothesis_settings.register_profile("cem", deadline=None)
hypothesis_settings.load_profile("cem")


@pytest.fixture(scope="session")
def postgres():
    data_dir = Path(tempfile.mkdtemp(prefix="cem-test-pg-")) / "data"
    server = EmbeddedPostgres(data_dir, durable=False)
    server.start()
    migrate(server.url())
    yield server
    server.stop()


@pytest.fixture
def own_postgres(tmp_path):
    """A migrated PostgreSQL of the test's own, for tests that stop or restart it (`stop()`, then
    `start()` again: same port and data)."""
    server = EmbeddedPostgres(tmp_path / "postgres", durable=False)
    server.start()
    migrate(server.url())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka():
    broker = EmbeddedKafka()
    broker.start()
    yield broker
    broker.stop()


def make_settings(postgres: EmbeddedPostgres, kafka: EmbeddedKafka, **overrides) -> Settings:
    unique = uuid.uuid4().hex[:10]
    values = dict(
        tenant=f"t-{unique}",
        database_url=postgres.url(),
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        touchpoints_topic=f"cem.touchpoints.v1.{unique}",
        dlq_topic=f"cem.touchpoints.dlq.v1.{unique}",
        alerts_topic=f"cem.alerts.v1.{unique}",
        scoring_group_id=f"cem-scoring-{unique}",
        producer_idempotence=False,  # the embedded broker has no InitProducerId
        topic_partitions=4,
        producer_timeout_s=3.0,
        scoring_rebalance_timeout_ms=1_000,
        metrics_refresh_s=1.0,
        scoring_session_timeout_ms=6_000,
        # The tests of the pipeline act as the test's tenant without keys (loopback only); the
        # access tests (tests/integration/test_access.py, test_tenancy.py) turn it back on.
        auth_disabled=True,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(postgres, kafka) -> Settings:
    """Settings for one test: its own tenant, topics and consumer group on the shared servers."""
    return make_settings(postgres, kafka)
