"""The peer: the same scoring aggregates computed by Quix Streams, to compare events/s.

Runs in its own virtualenv (bench/.peer-venv: quixstreams pins older pydantic and
pydantic-settings than the project). It imports only `services.core.scoring`, the pure maths,
so both sides compute the same figures:

1. per customer (the record key, tenant:customer): the decayed CustomerState and one
   CustomerStageState per (journey, stage), in Quix's RocksDB state store;
2. re-keyed (group_by, a repartition topic) by (journey, stage, touchpoint, channel): the minute
   StageBucket sums and gap histogram, in the state store under the minute.

Differences from ours, for the record: at-least-once (Quix's exactly-once needs Kafka
transactions, which tansu lacks) and no de-duplication by event id; state in local RocksDB
plus changelog topics, not Postgres; nothing is queryable from outside.

`python -m bench.peer_quix --bootstrap B --topic T --group G --expect N --state-dir D`
prints one JSON line: {"events", "started", "first", "done"} (epoch seconds).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime

STARTED = time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()

    import orjson
    from quixstreams import Application

    from services.core.scoring import (
        CustomerStageState,
        CustomerState,
        HalfLives,
        ScoredEvent,
        StageBucket,
        minute_of,
    )  # fmt: skip

    half_lives = HalfLives(index_s=30 * 86400.0, trend_s=7 * 86400.0, revenue_s=90 * 86400.0)
    progress = {"events": 0, "first": None}

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=args.state_dir,
        processing_guarantee="at-least-once",
        loglevel="WARNING",
        auto_create_topics=True,
    )
    topic = app.topic(args.topic, value_deserializer="json", key_deserializer="str")

    def scored(value: dict) -> ScoredEvent:
        return ScoredEvent(
            event_id=value["event_id"],
            customer_id=value["customer_id"],
            journey=value["journey"],
            stage=value["stage"],
            touchpoint=value.get("touchpoint") or "",
            channel=value.get("channel") or "",
            occurred_s=datetime.fromisoformat(value["occurred_at"]).timestamp(),
            experience=value["experience"],
            expectation=value["expectation"],
            promise=value["promise"],
            weight=value["weight"],
            emotion=value.get("emotion"),
            revenue=value.get("revenue") or 0.0,
        )

    def customer_state(value: dict, state) -> None:
        if progress["first"] is None:
            progress["first"] = time.time()
        event = scored(value)
        delta = CustomerState.of(event)
        stored = state.get("customer")
        merged = delta if stored is None else CustomerState(**stored).merge(delta, half_lives)
        state.set("customer", merged.__dict__)
        stage_key = f"stage|{event.journey}|{event.stage}"
        stage_delta = CustomerStageState.of(event)
        stored_stage = state.get(stage_key)
        merged_stage = (
            stage_delta
            if stored_stage is None
            else CustomerStageState(**stored_stage).merge(stage_delta, half_lives.index_s)
        )
        state.set(stage_key, merged_stage.__dict__)

    def stage_bucket(value: dict, state) -> None:
        event = scored(value)
        key = str(minute_of(event.occurred_s))
        stored = state.get(key)
        bucket = StageBucket(**stored) if stored is not None else StageBucket()
        bucket.add(event)
        state.set(key, bucket.__dict__)
        progress["events"] += 1
        if progress["events"] >= args.expect:
            app.stop()

    frame = app.dataframe(topic)
    frame = frame.update(customer_state, stateful=True)
    frame = frame.group_by(
        lambda value: "|".join(
            (value["journey"], value["stage"], value.get("touchpoint") or "", value.get("channel") or "")
        ),
        name="stage-key",
    )
    frame = frame.update(stage_bucket, stateful=True)
    app.run()
    done = time.time()
    sys.stdout.write(
        orjson.dumps(
            {
                "events": progress["events"],
                "started": STARTED,
                "first": progress["first"],
                "done": done,
                "cpu_s": time.process_time(),
            }
        ).decode()
        + "\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    logging.getLogger("authlib").setLevel(logging.ERROR)
    main()
