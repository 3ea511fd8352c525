"""The one settings object of every service, read from CEM_* environment variables."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
# The contracts (JSON Schemas, journey maps) live beside the code in a checkout; an installed
# package (the container image) is told where they are.
SCHEMAS_DIR = Path(os.environ.get("CEM_SCHEMAS_DIR", REPO_ROOT / "schemas"))
DEFAULT_JOURNEYS_DIR = SCHEMAS_DIR / "journeys"

DAY_S = 86_400.0


class Settings(BaseSettings):
    """Configuration shared by ingest, scoring and the API.

    Every field can be set as an environment variable: `tenant` is `CEM_TENANT`.
    """

    model_config = SettingsConfigDict(env_prefix="CEM_", env_file=None, extra="ignore")

    tenant: str = Field("default", pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/cem"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    journeys_dir: Path = DEFAULT_JOURNEYS_DIR

    log_format: str = Field("json", pattern=r"^(json|text)$")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    host: str = "127.0.0.1"
    ingest_port: int = 8001
    api_port: int = 8000
    scoring_port: int = 8002

    touchpoints_topic: str = "cem.touchpoints.v1"
    dlq_topic: str = "cem.touchpoints.dlq.v1"
    alerts_topic: str = "cem.alerts.v1"
    topic_partitions: int = Field(12, ge=1)
    scoring_group_id: str = "cem-scoring"

    # Producer. Idempotence needs broker support (InitProducerId); the embedded dev broker lacks it.
    producer_idempotence: bool = True
    producer_linger_ms: int = Field(5, ge=0)
    producer_compression: str | None = Field(None, pattern=r"^(gzip|snappy|lz4|zstd)$")
    producer_timeout_s: float = Field(5.0, gt=0)
    # Events ingest holds at once while waiting for the broker's acknowledgement: past it, requests
    # are shed with 503 + Retry-After instead of queueing (bounded memory, fast answers).
    ingest_max_pending_events: int = Field(10_000, ge=1)

    # Validation limits (SPEC 3 and 4).
    max_event_age_days: float = Field(30.0, gt=0)
    max_future_skew_s: float = Field(300.0, ge=0)
    batch_max_events: int = Field(1000, ge=1)
    batch_max_bytes: int = Field(1_048_576, ge=1)

    # Scoring (SPEC 5).
    customer_half_life_days: float = Field(30.0, gt=0)
    trend_half_life_days: float = Field(7.0, gt=0)
    revenue_half_life_days: float = Field(90.0, gt=0)
    # Records per scoring transaction. Larger batches fold more events into each bucket row and
    # cost Postgres less per event (docs/performance.md); at low traffic a batch is what arrived.
    scoring_max_batch: int = Field(5000, ge=1)
    scoring_poll_timeout_ms: int = Field(200, ge=1)
    # The longest a fetch waits at the broker for records. Kafka answers as soon as records arrive,
    # whatever this is; tansu (cem dev) answers only when it runs out, so it bounds how late a
    # record is read there: the client's default, 500 ms, was most of figure 5's median (docs/performance.md).
    scoring_fetch_max_wait_ms: int = Field(100, ge=0, le=60_000)
    # Group members per scoring process, each with its own partitions and its own transaction at a
    # time: one's Python work runs while another's batch waits for Postgres (docs/performance.md).
    scoring_consumers: int = Field(2, ge=1, le=64)
    # How long the group coordinator waits for members to (re)join; the join itself waits for it.
    scoring_session_timeout_ms: int = Field(10_000, ge=1000)
    scoring_rebalance_timeout_ms: int = Field(10_000, ge=500)

    # Alerts (SPEC 7).
    # The window a stage's shortfall is judged over (the contract says 1 h; tests may shorten it).
    alert_stage_window_minutes: int = Field(60, ge=1)
    # How often open stage alerts are re-judged without traffic, so that they resolve once it stops.
    alert_reevaluate_interval_s: float = Field(15.0, gt=0)
    # How often the outbox relays look for new transitions (Kafka topic, webhook).
    alert_relay_interval_s: float = Field(0.25, gt=0)
    alert_webhook_url: str | None = None
    alert_webhook_secret: SecretStr | None = None
    alert_webhook_timeout_s: float = Field(5.0, gt=0)
    alert_webhook_max_attempts: int = Field(5, ge=1)
    # Server-Sent Events: how often a stream looks for new transitions, and its heartbeat.
    alert_stream_poll_s: float = Field(0.25, gt=0)
    alert_stream_ping_s: float = Field(15.0, gt=0)

    # Retention of processed_events, the de-duplication ledger (services/scoring/retention.py): a
    # row goes once it was scored more than max_event_age + max_future_skew + 2 min + this margin
    # ago. The margin must be at least the touchpoint topic's retention (Kafka's default: 7 days).
    dedup_retention_margin_days: float = Field(7.0, gt=0)
    # How often one scoring replica deletes the expired rows, and how many per transaction.
    dedup_retention_interval_s: float = Field(300.0, gt=0)
    dedup_retention_batch_rows: int = Field(10_000, ge=1, le=1_000_000)

    # How often scoring moves customers whose revenue decayed below their threshold (see sweep.py).
    quadrant_sweep_interval_s: float = Field(60.0, gt=0)

    # How often scoring refreshes the domain gauges (stage gaps, quadrants) from the aggregates.
    metrics_refresh_s: float = Field(15.0, gt=0)

    # Query API.
    page_limit_max: int = Field(500, ge=1)

    # Per-tenant journey maps (admin endpoints, docs/security.md): every service re-reads the
    # stored versions this often, so a change reaches ingest, scoring and the API within it.
    journeys_refresh_s: float = Field(5.0, gt=0)
    # Journeys a tenant may have stored and live at once (its own and the shipped ones it replaced).
    journeys_per_tenant_max: int = Field(100, ge=1)

    # Access (docs/security.md). Every /v1 request carries `Authorization: Bearer <API key>`; the key
    # names the tenant and the scopes. Without auth (tenant = CEM_TENANT) only when explicitly
    # disabled and bound to loopback: the services refuse to start otherwise.
    auth_disabled: bool = False
    # HMAC-SHA256 key the API key hashes are computed with. Changing it invalidates every key.
    api_key_pepper: SecretStr | None = None
    # A resolved key is trusted this long: revocation takes effect within it.
    auth_cache_ttl_s: float = Field(30.0, gt=0)
    # While the database is unreachable, keys verified less than this long ago stay valid, so
    # ingest keeps accepting events through a database outage.
    auth_cache_stale_s: float = Field(300.0, ge=0)
    # Per-key token bucket: sustained requests per second (0: no limit) and burst.
    rate_limit_per_s: float = Field(100.0, ge=0)
    rate_limit_burst: int = Field(200, ge=1)
    # Request limits: URL path (414 beyond), all headers together (431 beyond), time until the
    # response starts (503 beyond; a stream's body is not cut).
    max_path_bytes: int = Field(2048, ge=64)
    max_header_bytes: int = Field(16_384, ge=1024)
    request_timeout_s: float = Field(30.0, gt=0)
    # Browser origins allowed to call the APIs (comma-separated); empty: CORS closed.
    cors_origins: str = ""

    @cached_property
    def customer_half_life_s(self) -> float:
        return self.customer_half_life_days * DAY_S

    @cached_property
    def trend_half_life_s(self) -> float:
        return self.trend_half_life_days * DAY_S

    @cached_property
    def revenue_half_life_s(self) -> float:
        return self.revenue_half_life_days * DAY_S

    @cached_property
    def max_event_age_s(self) -> float:
        return self.max_event_age_days * DAY_S

    @cached_property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]
