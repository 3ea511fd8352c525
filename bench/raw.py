"""The physical-limit baselines, each run as its own process like the service it is compared with.

- `produce`: a bare aiokafka producer (services.core.kafka.create_producer: acks=all and the same
  linger, compression and batch size as ingest) writing the same records as ingest would, in
  groups of `group` with `inflight` groups outstanding, for a bounded time: events/s.
- `sink`: a bare consumer (same max_poll_records as scoring) that decodes each record with
  orjson and COPYs every polled batch into one Postgres table (asyncpg copy_records_to_table),
  one transaction per batch, until `expect` records are in: events/s.

`python -m bench.raw produce|sink '<json spec>'` prints one JSON line.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime, timezone

import orjson

STARTED = time.time()

RAW_TABLE = "bench_raw_events"
RAW_COLUMNS = (
    "tenant",
    "event_id",
    "customer_id",
    "journey",
    "stage",
    "touchpoint",
    "channel",
    "occurred_at",
    "received_at",
    "experience",
    "expectation",
    "promise",
    "weight",
    "emotion",
    "revenue",
)
RAW_DDL = (
    f"CREATE TABLE IF NOT EXISTS {RAW_TABLE} (tenant text, event_id text, customer_id text, journey text, "
    "stage text, touchpoint text, channel text, occurred_at timestamptz, received_at timestamptz, "
    "experience float8, expectation float8, promise float8, weight float8, emotion text, revenue float8)"
)


async def produce(spec: dict) -> dict:
    from bench.data import EventFactory
    from services.core.journeys import load_journeys
    from services.core.kafka import TOUCHPOINT_SCHEMA_HEADER, create_producer
    from services.core.settings import DEFAULT_JOURNEYS_DIR, Settings

    settings = Settings(kafka_bootstrap_servers=spec["bootstrap"], producer_idempotence=False)
    factory = EventFactory(load_journeys(DEFAULT_JOURNEYS_DIR)[spec["journey"]], spec["customers"], spec["prefix"])
    now = datetime.now(timezone.utc)
    pool = [factory.record(spec["tenant"], now) for _ in range(spec["pool"])]
    producer = create_producer(settings)
    await producer.start()
    group, topic = spec["group"], spec["topic"]
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + spec.get("warmup_s", 0.5)
    stop_at = measure_from + spec["duration_s"]
    counted = 0
    position = 0

    async def one_group() -> None:
        nonlocal counted, position
        while loop.time() < stop_at:
            chunk = [pool[(position + i) % len(pool)] for i in range(group)]
            position += group
            started = loop.time()
            futures = [
                await producer.send(topic, value=value, key=key, headers=[TOUCHPOINT_SCHEMA_HEADER])
                for key, value in chunk
            ]
            await asyncio.gather(*futures)
            if started >= measure_from:
                counted += group

    cpu = time.process_time()
    await asyncio.gather(*(one_group() for _ in range(spec["inflight"])))
    elapsed = loop.time() - measure_from
    await producer.stop()
    return {"events": counted, "elapsed_s": elapsed, "cpu_s": time.process_time() - cpu}


async def sink(spec: dict) -> dict:
    import asyncpg
    from aiokafka import AIOKafkaConsumer

    conn = await asyncpg.connect(spec["dsn"])
    await conn.execute(RAW_DDL)
    consumer = AIOKafkaConsumer(
        spec["topic"],
        bootstrap_servers=spec["bootstrap"],
        group_id=spec["group"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=spec["max_batch"],
        session_timeout_ms=spec["session_timeout_ms"],
        heartbeat_interval_ms=min(1000, spec["session_timeout_ms"] // 3),
    )
    await consumer.start()
    total, first = 0, None
    parse = datetime.fromisoformat
    try:
        while total < spec["expect"]:
            batch = await consumer.getmany(timeout_ms=200, max_records=spec["max_batch"])
            rows = []
            for records in batch.values():
                for record in records:
                    value = orjson.loads(record.value)
                    rows.append(
                        (
                            value["tenant"],
                            value["event_id"],
                            value["customer_id"],
                            value["journey"],
                            value["stage"],
                            value["touchpoint"],
                            value["channel"],
                            parse(value["occurred_at"]),
                            parse(value["received_at"]),
                            value["experience"],
                            value["expectation"],
                            value["promise"],
                            value["weight"],
                            value["emotion"],
                            value["revenue"],
                        )
                    )
            if not rows:
                continue
            if first is None:
                first = time.time()
            async with conn.transaction():
                await conn.copy_records_to_table(RAW_TABLE, records=rows, columns=RAW_COLUMNS)
            await consumer.commit()
            total += len(rows)
    finally:
        await consumer.stop()
        await conn.close()
    return {"events": total, "started": STARTED, "first": first, "done": time.time(), "cpu_s": time.process_time()}


def main() -> None:
    import uvloop

    mode, spec = sys.argv[1], orjson.loads(sys.argv[2])
    result = uvloop.run(produce(spec) if mode == "produce" else sink(spec))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
