"""Benchmark data: posted events, the records ingest writes to Kafka, and the large query dataset
generated directly in Postgres (generate_series), so that no benchmark waits for the pipeline."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import orjson

from services.core.journeys import Journey, load_journeys
from services.core.kafka import touchpoint_key
from services.core.settings import DEFAULT_JOURNEYS_DIR, Settings

CHANNELS = ("app", "web", "in_person", "pos", "call_centre")
EMOTIONS = (None, None, "delighted", "pleased", "neutral", "annoyed", "frustrated", "angry")
SOURCES = ("survey", "behavioural", "review", "mystery_shopper")


def journeys() -> dict[str, Journey]:
    return load_journeys(DEFAULT_JOURNEYS_DIR)


@dataclass
class EventFactory:
    """Valid touchpoint events of one journey: `customers` customers, spread over the last
    `spread_s` seconds, each event a different id (prefix + counter)."""

    journey: Journey
    customers: int
    prefix: str
    seed: int = 7
    spread_s: float = 3000.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.counter = 0

    def event(self, now: datetime | None = None) -> dict:
        rng = self.rng
        now = now or datetime.now(timezone.utc)
        stage = rng.choice(self.journey.stages)
        self.counter += 1
        event = {
            # Random, as clients' UUIDs are: de-duplication then inserts into random index pages.
            "event_id": f"{self.prefix}-{uuid.UUID(int=rng.getrandbits(128))}",
            "occurred_at": (now - timedelta(seconds=rng.uniform(0, self.spread_s))).isoformat(),
            "customer_id": f"c{rng.randrange(self.customers)}",
            "journey": self.journey.id,
            "stage": stage.id,
            "channel": rng.choice(CHANNELS),
            "source": rng.choice(SOURCES),
            "experience": round(rng.uniform(2, 10), 1),
            "revenue": round(rng.lognormvariate(4, 1.2), 2),
        }
        if stage.touchpoints:
            event["touchpoint"] = rng.choice(stage.touchpoints)
        if rng.random() < 0.4:
            event["expectation"] = round(rng.uniform(5, 10), 1)
        emotion = rng.choice(EMOTIONS)
        if emotion:
            event["emotion"] = emotion
        return event

    def events(self, count: int) -> list[dict]:
        now = datetime.now(timezone.utc)
        return [self.event(now) for _ in range(count)]

    def record(self, tenant: str, now: datetime) -> tuple[bytes, bytes]:
        """(key, value) of the record ingest would write for a new event (TouchpointRecord JSON)."""
        event = self.event(now)
        stage = self.journey.stage(event["stage"])
        value = {
            "tenant": tenant,
            "event_id": event["event_id"],
            "occurred_at": event["occurred_at"].replace("+00:00", "Z"),
            "received_at": now.isoformat().replace("+00:00", "Z"),
            "customer_id": event["customer_id"],
            "journey": event["journey"],
            "stage": event["stage"],
            "touchpoint": event.get("touchpoint"),
            "channel": event["channel"],
            "source": event["source"],
            "experience": float(event["experience"]),
            "expectation": float(event.get("expectation", stage.promise)),
            "promise": stage.promise,
            "weight": stage.weight,
            "emotion": event.get("emotion"),
            "revenue": event["revenue"],
            "attributes": None,
        }
        return touchpoint_key(tenant, event["customer_id"]), orjson.dumps(value)


def check_record_format(tenant: str) -> None:
    """The records the benchmarks pre-produce must be what ingest writes: compare with the model."""
    from services.core.events import TouchpointRecord, ValidationContext, validate_event

    factory = EventFactory(journeys()["hotel"], 10, "check")
    now = datetime.now(timezone.utc)
    _, value = factory.record(tenant, now)
    decoded = TouchpointRecord.model_validate_json(value)
    assert orjson.loads(decoded.to_json()) == orjson.loads(value), (decoded.to_json(), value)
    settings = Settings()
    context = ValidationContext(tenant, journeys(), now, settings.max_event_age_s, settings.max_future_skew_s)
    factory = EventFactory(journeys()["hotel"], 10, "check")
    record = validate_event(factory.event(now), context)
    assert set(orjson.loads(record.to_json())) == set(orjson.loads(value))


def records(tenant: str, journey: Journey, customers: int, count: int, prefix: str) -> list[tuple[bytes, bytes]]:
    factory = EventFactory(journey, customers, prefix)
    now = datetime.now(timezone.utc)
    return [factory.record(tenant, now) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# The query dataset: customers, their stages and the stage buckets, generated in SQL.


def _combos(all_journeys: dict[str, Journey]) -> list[tuple[str, str, str, str, float]]:
    """(journey, stage, touchpoint, channel, promise) of every bucket key the dataset uses:
    each touchpoint of the map through two channels."""
    combos = []
    for journey in all_journeys.values():
        for position, stage in enumerate(journey.stages):
            for index, touchpoint in enumerate(stage.touchpoints or ("",)):
                for channel in (
                    CHANNELS[(position + index) % len(CHANNELS)],
                    CHANNELS[(position + index + 2) % len(CHANNELS)],
                ):
                    combos.append((journey.id, stage.id, touchpoint, channel, stage.promise))
    return combos


async def generate_buckets(conn, tenant: str, events: int, days: int = 30) -> int:
    """Minute stage buckets over the last `days` days for `events` scored events, spread evenly
    over every bucket key (journey, stage, touchpoint, channel) of the shipped journeys.

    A (key, minute) holds a bucket with probability 1 - exp(-lambda), lambda being the mean
    events per key-minute, and then the events of a Poisson count conditioned on >= 1 (about);
    so the row count is what scoring that many events would leave. Returns the rows written.

    The hour and day roll-ups (migration 0006) are filled by stage_buckets' triggers in the same
    statement: one aggregation of its transition table, cheaper than a second pass over the table.
    """
    combos = _combos(journeys())
    minutes = days * 24 * 60
    lam = events / (minutes * len(combos))
    import math

    present = 1 - math.exp(-lam)
    mean_events = lam / present  # E[N | N >= 1]
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS bench_combos "
        "(journey text, stage text, touchpoint text, channel text, promise float8)"
    )
    await conn.execute("TRUNCATE bench_combos")
    await conn.copy_records_to_table("bench_combos", records=combos)
    # The roll-up triggers aggregate millions of rows per (key, hour): in memory, not in sorted runs on disk.
    await conn.execute("SET work_mem = '256MB'")
    status = await conn.execute(
        """
        INSERT INTO stage_buckets (tenant, journey, stage, minute, touchpoint, channel, events, expectation_sum,
            expectation_sq_sum, experience_sum, experience_sq_sum, gap_sum, gap_sq_sum, shortfall_events,
            promise_kept_events, negative_emotion_events, revenue_sum, gap_histogram)
        SELECT $1, journey, stage, minute, touchpoint, channel, n, n * expectation, n * expectation ^ 2,
            n * experience, n * experience ^ 2, n * (experience - expectation), n * (experience - expectation) ^ 2,
            CASE WHEN experience < expectation THEN n ELSE 0 END,
            CASE WHEN experience >= promise THEN n ELSE 0 END,
            (n * random() * 0.3)::bigint, n * 80.0 * random(),
            array_fill(0::bigint, ARRAY[bin - 1]) || ARRAY[n::bigint] || array_fill(0::bigint, ARRAY[40 - bin])
        FROM (
            SELECT c.journey, c.stage, c.touchpoint, c.channel, c.promise, m.minute,
                greatest(1, round($2::float8 + ($2::float8 - 1) * (random() * 2 - 1)))::bigint AS n,
                least(10.0, greatest(0.0, c.promise - 0.4 + random_normal(0, 0.5))) AS expectation,
                least(10.0, greatest(0.0, c.promise - 0.6 + random_normal(0, 1.2))) AS experience
            FROM generate_series(date_trunc('minute', now()) - make_interval(days => $3), date_trunc('minute', now()),
                interval '1 minute') AS m(minute)
            CROSS JOIN bench_combos c
            WHERE random() < $4::float8
        ) AS s
        CROSS JOIN LATERAL (
            SELECT least(40, greatest(1, floor((experience - expectation + 10) / 0.5)::int + 1)) AS bin
        ) AS h
        """,
        tenant, mean_events, days, present,
    )  # fmt: skip
    await conn.execute("RESET work_mem")
    # The windows read the roll-ups: plan them with statistics, as autovacuum would soon.
    await conn.execute("ANALYZE stage_buckets_hourly, stage_buckets_daily")
    return int(status.split()[-1])


async def generate_processed_events(conn, tenant: str, events: int, days: int = 30) -> None:
    """The de-duplication ledger of `events` scored events over `days` (random ids, as clients'
    UUIDs are; scored_at spread like occurred_at, so the retention keeps them): new events are
    then claimed against an index of that history, as in production."""
    await conn.execute("SET work_mem = '256MB'")
    # Sorted by id: the primary key fills leaf pages in order instead of splitting random ones.
    await conn.execute(
        """
        INSERT INTO processed_events (tenant, event_id, occurred_at, scored_at, payload_hash)
        SELECT $1, id, at, at, sha256(id::bytea) FROM (
            SELECT 'hist-' || gen_random_uuid() AS id,
                now() - make_interval(secs => random() * $3::float8 * 86400) AS at
            FROM generate_series(1, $2)
        ) AS history ORDER BY id
        """,
        tenant, events, days,
    )  # fmt: skip
    await conn.execute("RESET work_mem")
    await conn.execute("ANALYZE processed_events")


async def generate_customers(
    conn, tenant: str, customers: int, stages_per_customer: int = 3, revenue_half_life_days: float = 90.0
) -> None:
    """`customers` customers over the shipped journeys, with `stages_per_customer` stage states
    each; quadrants follow from the index and revenue as scoring would place them."""
    all_journeys = list(journeys().values())
    rows = [(index, journey.id, len(journey.stages), journey.revenue_threshold, journey.experience_threshold)
            for index, journey in enumerate(all_journeys)]  # fmt: skip
    stage_rows = [
        (journey.id, position, stage.id) for journey in all_journeys for position, stage in enumerate(journey.stages)
    ]
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS bench_journeys "
        "(n int, journey text, stages int, revenue_threshold float8, experience_threshold float8)"
    )
    await conn.execute("CREATE TEMP TABLE IF NOT EXISTS bench_stages (journey text, position int, stage text)")
    await conn.execute("TRUNCATE bench_journeys, bench_stages")
    await conn.copy_records_to_table("bench_journeys", records=rows)
    await conn.copy_records_to_table("bench_stages", records=stage_rows)
    half_life_s = revenue_half_life_days * 86400.0
    # Bulk load: the secondary indexes are dropped and built again afterwards from their own
    # definitions (a sorted build is many times faster than a million random insertions).
    indexes = await conn.fetch(
        "SELECT i.indexname, i.indexdef FROM pg_indexes i JOIN pg_class c ON c.relname = i.indexname "
        "JOIN pg_index x ON x.indexrelid = c.oid WHERE i.tablename IN ('customers', 'customer_stages') "
        "AND NOT x.indisprimary"
    )
    await conn.execute("SET maintenance_work_mem = '512MB'")
    for index in indexes:
        await conn.execute(f'DROP INDEX "{index["indexname"]}"')
    # One statement: the quadrant_totals triggers (migrations 0007, 0011) fire once, over all the rows
    # (~1 s of the load at 1 M customers), so the positioning map's totals are right for it.
    await conn.execute(
        """
        INSERT INTO customers (tenant, customer_id, last_event_at, first_event_at, latest_journey, latest_event_id,
            index_gap_sum, index_weight_sum, trend_gap_sum, trend_weight_sum, revenue_sum, events, experience_index,
            trend, revenue_rank, quadrant, updated_at)
        SELECT $1, 'c' || i, last_at, last_at - interval '20 days', j.journey, 'seed-' || i,
            idx * w, w, (idx + tr) * w, w, revenue, events, idx, tr,
            CASE WHEN revenue > 0
                THEN ln(revenue) / ln(2.0::float8) + extract(epoch FROM last_at)::float8 / $3::float8
                ELSE -1e300 END,
            CASE WHEN idx >= j.experience_threshold THEN
                CASE WHEN revenue * power(2.0::float8, extract(epoch FROM last_at - now())::float8 / $3::float8)
                    >= j.revenue_threshold THEN 'exemplary' ELSE 'growth' END
            ELSE
                CASE WHEN revenue * power(2.0::float8, extract(epoch FROM last_at - now())::float8 / $3::float8)
                    >= j.revenue_threshold THEN 'at_risk' ELSE 'disengaged' END
            END, now()
        FROM (
            SELECT i, now() - random() * interval '30 days' AS last_at, random_normal(0.4, 1.2) AS idx,
                random_normal(0, 0.3) AS tr, 1.0 + random() * 4 AS w, exp(random_normal(6.2, 1.4)) AS revenue,
                1 + (random() * 20)::bigint AS events, i % $4 AS jn
            FROM generate_series(0, $2 - 1) AS i
        ) AS c JOIN bench_journeys j ON j.n = c.jn
        """,
        tenant, customers, half_life_s, len(rows),
    )  # fmt: skip
    await conn.execute(
        """
        INSERT INTO customer_stages (tenant, customer_id, journey, stage, last_event_at, gap_sum, weight_sum, events)
        SELECT $1, c.customer_id, c.latest_journey, s.stage, c.last_event_at - k * interval '1 hour',
            random_normal(0.3, 1.5) * 2, 2.0, 1 + (random() * 5)::bigint
        FROM customers c
        CROSS JOIN generate_series(0, $2 - 1) AS k
        JOIN bench_journeys j ON j.journey = c.latest_journey
        JOIN bench_stages s ON s.journey = c.latest_journey
            AND s.position = (abs(hashtext(c.customer_id)) + k) % j.stages
        WHERE c.tenant = $1
        """,
        tenant, stages_per_customer,
    )  # fmt: skip
    for index in indexes:
        await conn.execute(index["indexdef"])
    await conn.execute("ANALYZE customers")
    await conn.execute("ANALYZE customer_stages")
