"""Prometheus metric objects of the three services (SPEC 8). No customer or event id in any label."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# Every service
EVENT_LOOP_LAG = Histogram(
    "cem_event_loop_lag_seconds",
    "How late a timer of the event loop fired (a sleep of a fixed interval, minus the interval): "
    "time the loop was busy or stalled with work ready",
    buckets=LATENCY_BUCKETS,
)
LOG_LINES_DROPPED = Counter(
    "cem_log_lines_dropped_total",
    "Log lines dropped because the log output (stderr) fell too far behind, by level",
    ["level"],
)
# Exported at 0 from the start: increase() then sees the first drops (a series born at its first
# drop has no earlier sample to count from), and dashboards find the series in every service.
for _level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    LOG_LINES_DROPPED.labels(_level)

# Ingest
INGEST_EVENTS = Counter(
    "cem_ingest_events_total",
    "Events received by ingest, by result (accepted, rejected, failed) and reason",
    ["result", "reason"],
)
INGEST_REQUEST_DURATION = Histogram(
    "cem_ingest_request_duration_seconds",
    "Ingest HTTP request duration",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
INGEST_PRODUCE_DURATION = Histogram(
    "cem_ingest_produce_duration_seconds",
    "Time from handing events to the producer until the broker acknowledged them",
    buckets=LATENCY_BUCKETS,
)
INGEST_PENDING_EVENTS = Gauge(
    "cem_ingest_pending_events", "Events handed to the producer and not yet acknowledged by the broker"
)

# Scoring
SCORING_EVENTS = Counter(
    "cem_scoring_events_total", "Records handled by scoring, by result (scored, duplicate, dlq)", ["result"]
)
SCORING_BATCH_DURATION = Histogram(
    "cem_scoring_batch_duration_seconds", "Duration of one scoring batch transaction", buckets=LATENCY_BUCKETS
)
SCORING_BATCH_EVENTS = Histogram(
    "cem_scoring_batch_events", "Records per scoring batch", buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
)
SCORING_LAG = Gauge("cem_scoring_lag_records", "Records behind the end of the partition", ["partition"])
SCORING_FAILURES = Counter(
    "cem_scoring_batch_failures_total",
    "Scoring batches that failed and were retried, by reason (database, broker, error, stale_offsets)",
    ["reason"],
)
SCORING_DUPLICATES_CONFLICTING = Counter(
    "cem_scoring_duplicates_conflicting_total",
    "Records reusing a scored event id with a different payload: ignored (the first one counts)",
)
SCORING_DEDUP_ROWS_DELETED = Counter(
    "cem_scoring_dedup_rows_deleted_total",
    "processed_events (de-duplication) rows deleted by the retention task once expired",
)
SCORING_DEDUP_LAST_RUN = Gauge(
    "cem_scoring_dedup_retention_last_run_timestamp_seconds",
    "Unix time of the last completed processed_events retention run (0: none in this replica)",
)
SCORING_DEDUP_OLDEST_AGE = Gauge(
    "cem_scoring_dedup_oldest_row_age_seconds",
    "Age (by scored_at) of the oldest processed_events row, as of this replica's last retention run",
)
EVENT_TO_SCORE = Histogram(
    "cem_event_to_score_seconds",
    "Time from received_at (ingest) to the scoring transaction's commit",
    buckets=FRESHNESS_BUCKETS,
)

# Domain gauges (exported by scoring, refreshed from the aggregates)
STAGE_MEAN_GAP = Gauge("cem_stage_mean_gap", "Mean expectation gap of a stage", ["journey", "stage", "window"])
STAGE_SHORTFALL_RATIO = Gauge(
    "cem_stage_shortfall_ratio", "Share of a stage's events with gap < 0", ["journey", "stage", "window"]
)
CUSTOMERS = Gauge("cem_customers", "Customers per positioning-map quadrant", ["quadrant"])
REVENUE = Gauge("cem_revenue", "Decayed revenue per positioning-map quadrant", ["quadrant"])
ALERTS_OPEN = Gauge("cem_alerts_open", "Open (or acknowledged) alerts by kind", ["kind"])
ALERT_TRANSITIONS = Counter("cem_alert_transitions_total", "Alert transitions by kind and new status", ["kind", "to"])
ALERT_WEBHOOK_FAILURES = Counter(
    "cem_alert_webhook_failures_total", "Alert transitions the webhook did not take after every retry"
)

# API
API_REQUEST_DURATION = Histogram(
    "cem_api_request_duration_seconds",
    "Query API HTTP request duration",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)


ALERT_KINDS = ("customer_at_risk", "customer_hot", "stage_shortfall")
ALERT_STATUSES = ("open", "acknowledged", "resolved")
# Export every alert series from the start, at zero: a rule on a missing series never fires.
for _kind in ALERT_KINDS:
    ALERTS_OPEN.labels(_kind)
    for _status in ALERT_STATUSES:
        ALERT_TRANSITIONS.labels(_kind, _status)
