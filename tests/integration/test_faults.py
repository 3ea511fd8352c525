"""Fault injection against the real broker (tansu) and the real Postgres: processes killed,
stopped, outages, poison records, rebalancing, client retries and overload. Each test streams
events while the fault happens and then proves that nothing was lost and nothing counted twice,
by comparing the stored figures with the pure computation over the unique events.

Every test reports its figures on one `FAULT FIGURES {...}` line (and in figures.json in its
tmp_path; in $CEM_FAULT_FIGURES too if set). Longer soak variants run with CEM_SLOW_TESTS=1.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.core.db.engine import create_engine, migrate
from services.core.embedded import EmbeddedKafka, EmbeddedPostgres
from services.core.events import TouchpointRecord
from services.core.db.journeys import JourneyLoader
from services.core.kafka import create_producer, ensure_topics
from services.core.settings import REPO_ROOT
from services.scoring.consumer import Scorer
from services.scoring.dlq import replay_dead_letters
from tests.conftest import make_settings
from tests.faults.support import (
    ScoringProcess,
    Stream,
    exactly_once_figures,
    processed_count,
    report,
    scalar,
    service_env,
    wait_until_processed,
)
from tests.integration.test_ingest import eventually, is_ready, running_ingest, topic_event_ids, touchpoint
from tests.integration.test_scoring import (
    RunningScorer,
    assert_customers_match,
    customer_rows,
    expected_state,
    generate_records,
    produce,
    stage_totals,
)

pytestmark = pytest.mark.integration

soak = pytest.mark.skipif(os.environ.get("CEM_SLOW_TESTS") != "1", reason="soak variant: set CEM_SLOW_TESTS=1")


def with_retries(records, rng: random.Random, share: float):
    """The records plus a share of them sent again (a producer's or a client's retries), shuffled."""
    stream = records + rng.sample(records, int(len(records) * share))
    rng.shuffle(stream)
    return stream


async def assert_figures_exact(engine, settings, records) -> None:
    buckets, customers = expected_state(settings, records)
    assert await stage_totals(engine, settings.tenant) == buckets
    assert_customers_match(await customer_rows(engine, settings.tenant), customers)


async def stored_offsets_total(engine, settings) -> int:
    return await scalar(
        engine, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = :g",
        g=settings.scoring_group_id,
    )  # fmt: skip


async def read_topic(settings, topic: str, timeout_s: float = 10.0) -> list[ConsumerRecord]:
    """Every record of a topic, up to its end: the high watermark of a fetch, since tansu's
    ListOffsets(latest) undercounts batched writes."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while True:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
            highwaters = [consumer.highwater(tp) for tp in partitions]
            positions = [await consumer.position(tp) for tp in partitions]
            if None not in highwaters and all(p >= h for p, h in zip(positions, highwaters)):
                return records
            assert time.monotonic() < deadline, f"{topic} not read to its end in {timeout_s} s"
    finally:
        await consumer.stop()


async def bucket_sums(engine, tenant: str) -> tuple[int, float]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT coalesce(sum(events), 0) AS events, coalesce(sum(experience_sum), 0) AS experience "
                     "FROM stage_buckets WHERE tenant = :t"),
                {"t": tenant},
            )  # fmt: skip
        ).one()
    return int(row.events), float(row.experience)


# ---------------------------------------------------------------------------------------------
# 1. Scoring crashes (SIGKILL) and stops (SIGTERM), as a separate OS process.


async def kill_scoring_repeatedly(request, settings, tmp_path, events: int, kills: int, seed: int) -> None:
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    rng = random.Random(seed)
    # Twice the events wanted: the stream runs through all the kills (a restart takes 10 to 15 s,
    # as a tansu join waits out the dead member), then stops once `events` are sent.
    records = generate_records(settings.tenant, 2 * events, seed=seed, customers=400)
    stream = Stream(settings, with_retries(records, rng, share=0.05), chunk=500, pause_s=0.65)
    processes: list[ScoringProcess] = []
    kill_points: list[int] = []
    started = time.monotonic()
    try:
        stream.start()
        for number in range(kills):
            process = ScoringProcess(settings, tmp_path, f"scoring-{number}").start()
            processes.append(process)
            await process.wait_listening()
            # Kill it while it works: once it has scored something, at a random moment after.
            await wait_until_processed(engine, settings.tenant, (kill_points[-1] if kill_points else 0) + 1)
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            process.kill()
            kill_points.append(await processed_count(engine, settings.tenant))
        survivor = ScoringProcess(settings, tmp_path, "scoring-last").start()
        processes.append(survivor)
        streaming_during_kills = not stream.task.done()
        await stream.stop(at_least=events)
        unique = stream.unique_sent
        await wait_until_processed(engine, settings.tenant, len(unique), timeout_s=120)
        await asyncio.sleep(1.0)  # a batch scored twice would land now
        elapsed_s = time.monotonic() - started

        await assert_figures_exact(engine, settings, unique)
        assert await stored_offsets_total(engine, settings) == stream.sent
        figures = await exactly_once_figures(engine, settings.tenant, {r.event_id for r in unique})
        report(
            request, events_sent=stream.sent, unique_events=len(unique), faults="SIGKILL scoring",
            faults_injected=kills, scored_when_killed=kill_points, seconds=round(elapsed_s, 1), **figures,
        )  # fmt: skip
        assert figures["events_lost"] == figures["events_double_counted"] == 0
        assert streaming_during_kills, "the stream ended before the kills: slow it down"

        survivor.terminate()
        assert await survivor.wait_exit(30) == 0, survivor.log_tail()
    finally:
        for process in processes:
            process.ensure_stopped()
        await engine.dispose()


@pytest.mark.timeout(240)
async def test_scoring_killed_three_times_mid_stream_loses_nothing_and_counts_nothing_twice(
    request, settings, tmp_path
):
    await kill_scoring_repeatedly(request, settings, tmp_path, events=20_000, kills=3, seed=41)


@pytest.mark.slow
@soak
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [43, 44])
async def test_soak_scoring_killed_ten_times(request, settings, tmp_path, seed):
    await kill_scoring_repeatedly(request, settings, tmp_path, events=100_000, kills=10, seed=seed)



async def wait_for_lock_waiter(engine, timeout_s: float = 30.0) -> None:
    """Until a Postgres session other than ours waits for a row lock."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        waiting = await scalar(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no scoring transaction waited for the lock within {timeout_s} s")


@pytest.mark.timeout(120)
async def test_sigterm_lets_scoring_commit_the_batch_in_flight_then_exit_0(request, settings, tmp_path):
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 6_000, seed=51, customers=300)
    process = ScoringProcess(settings, tmp_path, "scoring").start()
    try:
        await Stream(settings, records[:2_000]).start().finished()
        await wait_until_processed(engine, settings.tenant, 2_000)
        await process.wait_idle()  # the first batch after a join may be delivered twice: let it pass
        before = await processed_count(engine, settings.tenant)
        async with engine.connect() as blocker:
            # Hold the group's offset rows: the next batch writes its aggregates, then waits to
            # store its offsets, inside its transaction. That batch is "in flight" at SIGTERM.
            holding = await blocker.begin()
            await blocker.execute(
                text("SELECT 1 FROM consumer_offsets WHERE group_id = :g FOR UPDATE"), {"g": settings.scoring_group_id}
            )
            await Stream(settings, records[2_000:]).start().finished()
            await wait_for_lock_waiter(engine)
            process.terminate()
            signalled = time.monotonic()
            await asyncio.sleep(1.5)
            assert process.process.poll() is None, "scoring exited without finishing its batch"
            await holding.rollback()
            released = time.monotonic()
        exit_code = await process.wait_exit(20)
        exit_s = time.monotonic() - released

        assert exit_code == 0, process.log_tail()
        assert exit_s < 10
        scored = await processed_count(engine, settings.tenant)
        assert scored > before  # the batch in flight was committed, not abandoned
        # Offsets and aggregates moved together: the stored offsets cover exactly what was scored.
        assert await stored_offsets_total(engine, settings) == scored
        async with engine.connect() as conn:
            query = text("SELECT event_id FROM processed_events WHERE tenant = :t")
            scored_ids = set((await conn.execute(query, {"t": settings.tenant})).scalars().all())
        await assert_figures_exact(engine, settings, [record for record in records if record.event_id in scored_ids])
        report(
            request, events_sent=len(records), faults="SIGTERM scoring with a batch in flight", faults_injected=1,
            scored_before_batch=before, scored_at_exit=scored, exit_code=exit_code,
            seconds_from_sigterm_to_exit=round(time.monotonic() - signalled, 2),
            seconds_from_lock_release_to_exit=round(exit_s, 2), events_lost=0, events_double_counted=0,
        )  # fmt: skip
    finally:
        process.ensure_stopped()
        await engine.dispose()


# ---------------------------------------------------------------------------------------------
# 2. Rebalancing: scorers join and leave the group while events flow.


class Member:
    """One in-process scorer of the group, with its own engine (as a separate replica would have)."""

    def __init__(self, settings, name: str):
        self.name = name
        self.engine = create_engine(settings.database_url)
        self.scorer = Scorer(settings, self.engine, JourneyLoader.shipped(settings))
        self.task = asyncio.create_task(self.scorer.run(), name=f"scorer-{name}")

    async def leave(self) -> None:
        self.scorer.stop()
        await asyncio.wait_for(self.task, 30)
        await self.engine.dispose()

    def partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self.scorer.stored_offsets)


async def settled(members: list[Member], settings, change: str, timeout_s: float = 60.0) -> str:
    """Until every member owns partitions and together they own each exactly once; a timeline entry."""
    started = time.monotonic()
    while True:
        owned = [partition for member in members for partition in member.partitions()]
        if sorted(owned) == list(range(settings.topic_partitions)) and all(m.partitions() for m in members):
            return f"{change}: {time.monotonic() - started:.1f}s {[member.partitions() for member in members]}"
        assert time.monotonic() - started < timeout_s, f"{change}: not settled in {timeout_s} s: {owned}"
        await asyncio.sleep(0.05)


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("cem_scoring_batch_failures_total", {"reason": reason}) or 0.0


async def rebalance_while_streaming(request, postgres, kafka, events: int, rounds: int, seed: int) -> None:
    settings = make_settings(postgres, kafka, topic_partitions=6)
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    rng = random.Random(seed)
    records = generate_records(settings.tenant, events, seed=seed, customers=400)
    # Paced to last through the group changes (a tansu rebalance takes 3 to 11 s).
    stream = Stream(settings, with_retries(records, rng, share=0.05), chunk=300, pause_s=0.5)
    stale_before = failures("stale_offsets")
    members: list[Member] = []
    timeline: list[str] = []
    started = time.monotonic()
    try:
        stream.start()
        members.append(Member(settings, "a"))
        timeline.append(await settled(members, settings, "+a"))
        for round_number in range(rounds):
            # Grow to three members, one at a time, then shrink back to one.
            for name in ("b", "c"):
                members.append(Member(settings, f"{name}{round_number}"))
                timeline.append(await settled(members, settings, f"+{members[-1].name}"))
            for _ in range(2):
                leaving = members.pop(0)
                await leaving.leave()
                timeline.append(await settled(members, settings, f"-{leaving.name}"))
        streaming_during_changes = not stream.task.done()
        await stream.stop()
        unique = stream.unique_sent
        await wait_until_processed(engine, settings.tenant, len(unique), timeout_s=120)
        await asyncio.sleep(1.0)

        await assert_figures_exact(engine, settings, unique)
        assert await stored_offsets_total(engine, settings) == stream.sent
        figures = await exactly_once_figures(engine, settings.tenant, {r.event_id for r in unique})
        report(
            request, events_sent=stream.sent, unique_events=len(unique),
            faults="scorers joining and leaving the group", faults_injected=4 * rounds,
            stale_offset_fences=int(failures("stale_offsets") - stale_before), timeline=timeline,
            streaming_during_changes=streaming_during_changes,
            seconds=round(time.monotonic() - started, 1), **figures,
        )  # fmt: skip
        assert figures["events_lost"] == figures["events_double_counted"] == 0
        assert streaming_during_changes, "the stream ended before the group changes: slow it down"
    finally:
        for member in members:
            await member.leave()
        await engine.dispose()


@pytest.mark.timeout(240)
async def test_scorers_joining_and_leaving_mid_stream_lose_nothing_and_count_nothing_twice(request, postgres, kafka):
    await rebalance_while_streaming(request, postgres, kafka, events=20_000, rounds=1, seed=61)


@pytest.mark.slow
@soak
@pytest.mark.timeout(900)
async def test_soak_scorers_joining_and_leaving(request, postgres, kafka):
    await rebalance_while_streaming(request, postgres, kafka, events=100_000, rounds=4, seed=62)




@pytest.mark.timeout(120)
async def test_two_owners_of_a_partition_at_once_one_commit_wins_and_the_other_is_fenced(
    request, settings, tmp_path
):
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 3_000, seed=111, customers=200)
    stale_before = failures("stale_offsets")
    frozen = ScoringProcess(settings, tmp_path, "scoring-frozen").start()
    members: list[Member] = []
    try:
        await produce(settings, records[:1_000])
        await wait_until_processed(engine, settings.tenant, 1_000)
        await frozen.wait_idle()
        async with engine.connect() as blocker:
            # Its next batch is written but not committed (waiting for the offset rows), then the
            # process freezes: no heartbeats, its transaction open. A long GC pause looks the same.
            holding = await blocker.begin()
            await blocker.execute(
                text("SELECT 1 FROM consumer_offsets WHERE group_id = :g FOR UPDATE"), {"g": settings.scoring_group_id}
            )
            await produce(settings, records[1_000:2_000])
            await wait_for_lock_waiter(engine)
            frozen.process.send_signal(signal.SIGSTOP)
            # The group evicts it after its session timeout; a successor takes the partitions,
            # reads the same records from the stored offsets and scores them too.
            members.append(Member(settings, "successor"))
            took_over = await settled(members, settings, "+successor")
            await asyncio.sleep(1.0)
            await holding.rollback()
        await asyncio.sleep(0.5)
        # Two owners, one batch each over the same records: the frozen one, resumed, commits
        # first; the successor's compare-and-set then fails, it drops its batch and seeks again.
        frozen.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while failures("stale_offsets") == stale_before:
            assert time.monotonic() < deadline, "no commit was fenced"
            await asyncio.sleep(0.05)
        await produce(settings, records[2_000:])
        await wait_until_processed(engine, settings.tenant, len(records), timeout_s=60)
        await asyncio.sleep(1.0)

        await assert_figures_exact(engine, settings, records)
        assert await stored_offsets_total(engine, settings) == len(records)
        figures = await exactly_once_figures(engine, settings.tenant, {r.event_id for r in records})
        report(
            request, events_sent=len(records), faults="scoring frozen (SIGSTOP) mid-commit; a successor took over",
            faults_injected=1, takeover=took_over, stale_offset_fences=int(failures("stale_offsets") - stale_before),
            **figures,
        )  # fmt: skip
        assert figures["events_lost"] == figures["events_double_counted"] == 0
    finally:
        if frozen.process.poll() is None:
            frozen.process.send_signal(signal.SIGCONT)
        frozen.ensure_stopped()
        for member in members:
            await member.leave()
        await engine.dispose()

# ---------------------------------------------------------------------------------------------
# 3. Postgres outage: scoring retries with backoff, says why it is not ready, catches up exactly.


async def wait_readiness(process: ScoringProcess, ready: bool, containing: str = "", timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            response = await process.get("/readyz")
            body = response.json()
            if (response.status_code == 200) == ready and containing in " ".join(body.get("reasons", [])):
                return {"status_code": response.status_code, **body}
        except Exception as error:  # noqa: BLE001 - the process may be starting
            body = {"error": repr(error)}
        await asyncio.sleep(0.2)
    raise AssertionError(f"readiness not {ready} ({containing!r}) after {timeout_s} s: {body}\n{process.log_tail()}")


@pytest.mark.timeout(180)
async def test_postgres_outage_scoring_retries_reports_why_and_catches_up_exactly(request, kafka, tmp_path):
    database = EmbeddedPostgres(tmp_path / "postgres", durable=False)  # this test's own server: it stops it
    database.start()
    await asyncio.to_thread(migrate, database.url())
    settings = make_settings(database, kafka)
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 9_000, seed=71, customers=300)
    first = ScoringProcess(settings, tmp_path, "scoring-1").start()
    second = ScoringProcess(settings, tmp_path, "scoring-2")
    try:
        await Stream(settings, records[:3_000]).start().finished()
        await wait_until_processed(engine, settings.tenant, 3_000)
        await wait_readiness(first, ready=True)

        database.stop()
        outage_started = time.monotonic()
        await Stream(settings, records[3_000:6_000]).start().finished()
        not_ready = await wait_readiness(first, ready=False, containing="database")
        assert (await first.get("/healthz")).status_code == 200  # alive, only not ready
        retries_early = await first.metric("cem_scoring_batch_failures_total", reason="database")
        await asyncio.sleep(4)
        retries_late = await first.metric("cem_scoring_batch_failures_total", reason="database")
        # Backoff: a handful of attempts in 4 s (0.1 s doubling to 5 s), not a busy loop.
        assert 0 < retries_late - retries_early <= 6, (retries_early, retries_late)

        # A restart during the outage: SIGTERM ends the retries (the batch is not committed: exit
        # 1), and a new process, which cannot read its stored offsets, pauses its partitions.
        first.terminate()
        assert await first.wait_exit(15) == 1, first.log_tail()
        second.start()
        await Stream(settings, records[6_000:]).start().finished()
        paused = await wait_readiness(second, ready=False, containing="cannot read the stored offsets")
        outage_s = time.monotonic() - outage_started

        database = EmbeddedPostgres(tmp_path / "postgres", port=database.port, durable=False)  # same port and data
        database.start()
        await wait_until_processed(engine, settings.tenant, len(records), timeout_s=60)
        caught_up_s = time.monotonic() - outage_started - outage_s
        await wait_readiness(second, ready=True)
        await asyncio.sleep(0.5)

        await assert_figures_exact(engine, settings, records)
        assert await stored_offsets_total(engine, settings) == len(records)
        figures = await exactly_once_figures(engine, settings.tenant, {r.event_id for r in records})
        report(
            request, events_sent=len(records), faults="Postgres stopped; scoring restarted during the outage",
            faults_injected=2, outage_seconds=round(outage_s, 1), catch_up_seconds=round(caught_up_s, 1),
            retries_in_4_s=int(retries_late - retries_early), readyz_during_outage=not_ready["reasons"],
            readyz_after_restart=paused["reasons"], **figures,
        )  # fmt: skip
        assert figures["events_lost"] == figures["events_double_counted"] == 0
    finally:
        first.ensure_stopped()
        second.ensure_stopped()
        await engine.dispose()
        database.stop()


# ---------------------------------------------------------------------------------------------
# 4. Broker outage seen by ingest: every event that got a 202, before, during or after, is scored once.


async def post_until_accepted(ingest, events: list[dict], outcomes: dict[str, int]) -> None:
    """A well-behaved client: posts a batch, and on 503 waits Retry-After and posts it again."""
    while True:
        response = await ingest.post("/v1/events:batch", json={"events": events})
        outcomes[str(response.status_code)] = outcomes.get(str(response.status_code), 0) + 1
        if response.status_code == 202:
            assert response.json()["accepted"] == len(events)
            return
        assert response.status_code == 503 and response.headers["retry-after"], response.text
        await asyncio.sleep(float(response.headers["retry-after"]))


@pytest.mark.timeout(120)
async def test_events_accepted_around_a_broker_stall_are_scored_exactly_once(request, postgres):
    broker = EmbeddedKafka()  # this test's own broker: it freezes it
    broker.start()
    settings = make_settings(postgres, broker, producer_timeout_s=1.0)
    engine = create_engine(settings.database_url)
    rng = random.Random(101)
    events = [
        touchpoint(
            event_id=f"stall-{n}", customer_id=f"c-{rng.randrange(50)}", experience=round(rng.uniform(0, 10), 1),
            stage=rng.choice(["reservation", "pickup", "return"]),
        )
        for n in range(3_000)
    ]  # fmt: skip
    batches = [events[start : start + 50] for start in range(0, len(events), 50)]
    outcomes: dict[str, int] = {}
    try:
        async with running_ingest(settings) as ingest, RunningScorer(settings, engine):
            await eventually(lambda: is_ready(ingest), timeout_s=15)

            async def client(mine: list[list[dict]]) -> None:
                for batch in mine:
                    await post_until_accepted(ingest, batch, outcomes)
                    await asyncio.sleep(0.1)

            clients = [asyncio.create_task(client(batches[n::4])) for n in range(4)]
            # The outage lands mid-stream whatever ingest's speed: after a sixth of the batches.
            await eventually(lambda: asyncio.sleep(0, result=outcomes.get("202", 0) >= 10), timeout_s=30)
            broker.process.send_signal(signal.SIGSTOP)  # the outage: the broker answers nothing
            await asyncio.sleep(3.0)
            broker.process.send_signal(signal.SIGCONT)
            await asyncio.gather(*clients)
            await wait_until_processed(engine, settings.tenant, len(events), timeout_s=60)
            await asyncio.sleep(1.0)
            on_topic = len(await read_topic(settings, settings.touchpoints_topic))
        figures = await exactly_once_figures(engine, settings.tenant, {event["event_id"] for event in events})
        experience_sum = sum(event["experience"] for event in events)
        assert await bucket_sums(engine, settings.tenant) == (len(events), pytest.approx(experience_sum))
        report(
            request, events_sent=len(events), faults="broker stalled 3 s (SIGSTOP) under ingest load",
            faults_injected=1, requests=outcomes, records_on_topic=on_topic,
            written_by_a_request_answered_503=on_topic - len(events), **figures,
        )  # fmt: skip
        assert outcomes.get("503", 0) > 0, "the stall was not seen by any request"
        assert figures["events_lost"] == figures["events_double_counted"] == 0
    finally:
        if broker.process.poll() is None:
            broker.process.send_signal(signal.SIGCONT)
        broker.stop()
        await engine.dispose()

# ---------------------------------------------------------------------------------------------
# 5. Poison records: to the DLQ with the reason and where they came from; the partition moves on.


def dlq_total() -> float:
    return REGISTRY.get_sample_value("cem_scoring_events_total", {"result": "dlq"}) or 0.0


def poison_values(tenant: str, template: TouchpointRecord) -> dict[str, bytes | None]:
    """Records no ingest would write, each with what makes it poison."""
    valid = orjson.loads(template.to_json())

    def variant(**changes) -> bytes:
        return orjson.dumps({**valid, **changes})

    return {
        "not JSON": b"\xff\xfe{ this is not json",
        "no value (tombstone)": None,
        "missing fields": orjson.dumps({"tenant": tenant, "event_id": "poison-missing"}),
        "experience out of range": variant(event_id="poison-range", experience=42),
        "event id not allowed": variant(event_id="poison id with spaces"),
        "occurred 20 years before received": variant(event_id="poison-old", occurred_at="2006-01-01T00:00:00+00:00"),
        # Passes the record model; Postgres refuses the NUL in a text column (SQLSTATE 22021).
        "refused by Postgres": variant(event_id="poison-nul", touchpoint="kiosk\u0000"),
    }


@pytest.mark.timeout(120)
async def test_poison_records_go_to_the_dlq_with_reason_and_source_and_the_partition_moves_on(request, settings):
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 1_000, seed=81, customers=50)
    poison = poison_values(settings.tenant, records[0])
    dlq_before = dlq_total()
    producer = create_producer(settings)
    await producer.start()
    sources: dict[tuple[int, int], str] = {}
    try:
        await produce(settings, records[:500])
        for what, value in poison.items():
            # All in partition 0, between valid records: what follows them must still be scored.
            metadata = await producer.send_and_wait(settings.touchpoints_topic, value=value, key=b"poison", partition=0)
            sources[(metadata.partition, metadata.offset)] = what
        await produce(settings, records[500:])
        async with RunningScorer(settings, engine) as scorer:
            await wait_until_processed(engine, settings.tenant, len(records))
            await asyncio.sleep(0.5)
        dead_letters = await read_topic(settings, settings.dlq_topic)

        assert dlq_total() - dlq_before == len(poison)
        assert len(dead_letters) == len(poison)  # each once, even the one found by splitting its batch
        found = {}
        for letter in dead_letters:
            headers = {key: value.decode() for key, value in letter.headers}
            assert headers["source_topic"] == settings.touchpoints_topic
            source = (int(headers["source_partition"]), int(headers["source_offset"]))
            found[sources[source]] = headers["error"]
            assert letter.value == poison[sources[source]]
        assert set(found) == set(poison)
        assert found["not JSON"].startswith("undecodable touchpoint record")
        assert "experience" in found["experience out of range"]
        assert "event_id" in found["event id not allowed"]
        assert "accepted window" in found["occurred 20 years before received"]
        assert found["refused by Postgres"].startswith("Postgres refused the record")
        await assert_figures_exact(engine, settings, records)
        total_records = len(records) + len(poison)
        assert await stored_offsets_total(engine, settings) == total_records
        report(
            request, events_sent=total_records, poison_records=len(poison), faults="poison records",
            faults_injected=len(poison), dead_letters=len(dead_letters), events_lost=0, events_double_counted=0,
            scorer_batches=scorer.batches,
        )  # fmt: skip
    finally:
        await producer.stop()
        await engine.dispose()


@pytest.mark.timeout(120)
async def test_records_polled_again_while_their_batch_is_scored_are_scored_and_dead_lettered_once(
    request, settings, caplog
):
    # The race: aiokafka can hand a batch's records out again to the poll that runs while the batch
    # is scored (fetched before and again after the seek to the stored offsets on assignment).
    # Forced here: while the first batch is scored, its partitions are sought back to the offsets
    # stored before it, as the rebalance listener does, with the next poll waiting for records.
    settings = settings.model_copy(update={"scoring_poll_timeout_ms": 5_000})
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 300, seed=85, customers=30)
    poison = {what: value for what, value in poison_values(settings.tenant, records[0]).items()}
    poison.pop("refused by Postgres")  # found by splitting its batch: another path, tested above
    producer = create_producer(settings)
    await producer.start()
    sought_back: list[dict] = []

    async def seek_back_once(conn, outcome) -> None:
        if sought_back or not outcome.scored:
            return
        stored = {tp: scorer.stored_offsets.get(tp) or 0 for tp in scorer.consumer.assignment()}
        for tp, offset in stored.items():
            scorer.consumer.seek(tp, offset)
        sought_back.append(stored)
        await asyncio.sleep(0.5)  # the waiting poll fetches the records again meanwhile

    try:
        await produce(settings, records)
        for value in poison.values():
            await producer.send_and_wait(settings.touchpoints_topic, value=value, key=b"poison", partition=0)
        dlq_before = dlq_total()
        scorer = Scorer(settings, engine, JourneyLoader.shipped(settings), after_batch=seek_back_once)
        caplog.set_level("INFO", logger="cem.scoring")
        task = asyncio.create_task(scorer.run())
        try:
            await wait_until_processed(engine, settings.tenant, len(records))
            while await stored_offsets_total(engine, settings) < len(records) + len(poison):
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # a second scoring of the records polled again would land now
        finally:
            scorer.stop()
            await asyncio.wait_for(task, 30)
        dead_letters = await read_topic(settings, settings.dlq_topic)

        assert sought_back, "the first batch was never scored"
        assert "polled again after their batch committed: dropped" in caplog.text
        assert len(dead_letters) == len(poison)
        assert dlq_total() - dlq_before == len(poison)
        await assert_figures_exact(engine, settings, records)
        report(
            request, events_sent=len(records) + len(poison), faults="a batch's records polled again while it was scored",
            faults_injected=1, dead_letters=len(dead_letters), events_lost=0, events_double_counted=0,
        )  # fmt: skip
    finally:
        await producer.stop()
        await engine.dispose()


def cem(settings, *args: str) -> subprocess.CompletedProcess:
    """Run the `cem` command line with these settings, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=service_env(settings), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def duplicates_total() -> float:
    return REGISTRY.get_sample_value("cem_scoring_events_total", {"result": "duplicate"}) or 0.0


@pytest.mark.timeout(120)
async def test_dlq_replay_after_a_fix_scores_the_dead_letters_once_even_when_replayed_twice(request, settings):
    # The fault: scoring deployed with a one-day event age limit, so events older than a day are
    # dead-lettered; the fix puts it back to 30 days; `cem dlq replay` brings them back.
    misconfigured = settings.model_copy(update={"max_event_age_days": 1.0})
    await ensure_topics(settings)
    engine = create_engine(settings.database_url)
    records = generate_records(settings.tenant, 600, seed=91, customers=60)
    too_old = [r for r in records if (r.received_at - r.occurred_at).total_seconds() > 86_400 + 60]
    try:
        await produce(settings, records)
        async with RunningScorer(misconfigured, engine) as scorer:
            await wait_until_processed(engine, settings.tenant, len(records) - len(too_old))
            while await stored_offsets_total(engine, settings) < len(records):
                await asyncio.sleep(0.05)
            assert len(await read_topic(settings, settings.dlq_topic)) == len(too_old)

            scorer.settings = settings  # the fix is deployed (in place: a restart costs a group rejoin)
            topic_before = len(await read_topic(settings, settings.touchpoints_topic))
            dry = cem(settings, "dlq", "replay", "--dry-run")
            assert dry.returncode == 0, dry.stderr
            assert dry.stdout.count(f"would replay {settings.dlq_topic}[") == len(too_old)
            assert "accepted window" in dry.stdout and f"would replay {len(too_old)} of {len(too_old)}" in dry.stdout
            assert len(await read_topic(settings, settings.touchpoints_topic)) == topic_before  # sent nothing

            some = cem(settings, "dlq", "replay", "--limit", "50")
            rest = cem(settings, "dlq", "replay")
            assert some.returncode == rest.returncode == 0, some.stderr + rest.stderr
            assert f"replayed 50 of {len(too_old)}" in some.stdout
            assert f"replayed {len(too_old) - 50} of {len(too_old) - 50}" in rest.stdout
            await wait_until_processed(engine, settings.tenant, len(records))

            # Replayed again from the start (another replay group): counted once all the same.
            duplicates = duplicates_total()
            again = await replay_dead_letters(settings, group_id="replay-again", echo=lambda line: None)
            assert again.replayed == len(too_old)
            while duplicates_total() - duplicates < len(too_old):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
        await assert_figures_exact(engine, settings, records)
        report(
            request, events_sent=len(records), faults="dead-lettered by a misconfiguration, replayed twice",
            faults_injected=len(too_old), dead_letters=len(too_old), replayed=2 * len(too_old),
            events_lost=0, events_double_counted=0,
        )  # fmt: skip
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------------------------
# 6. Client retries: one event id posted many times counts once; another payload under a scored
#    event id is ignored and counted as a conflict.


def conflicts_total() -> float:
    return REGISTRY.get_sample_value("cem_scoring_duplicates_conflicting_total") or 0.0


@pytest.mark.timeout(120)
async def test_client_retries_count_once_and_a_conflicting_payload_is_ignored_and_counted(request, settings):
    engine = create_engine(settings.database_url)
    event = touchpoint(event_id="retry-1", customer_id="c-retry", experience=3.0)
    others = [touchpoint(customer_id=f"c-{n}") for n in range(20)]
    try:
        async with running_ingest(settings) as ingest, RunningScorer(settings, engine):
            await eventually(lambda: is_ready(ingest), timeout_s=15)
            conflicts, duplicates = conflicts_total(), duplicates_total()
            # A client that timed out retries, several times, concurrently, and in batches too.
            responses = await asyncio.gather(
                *(ingest.post("/v1/events", json=event) for _ in range(20)),
                *(ingest.post("/v1/events:batch", json={"events": [event, *others[n::5]]}) for n in range(5)),
            )
            assert [response.status_code for response in responses] == [202] * 25
            await wait_until_processed(engine, settings.tenant, 1 + len(others))
            while duplicates_total() - duplicates < 24:
                await asyncio.sleep(0.05)
            assert await bucket_sums(engine, settings.tenant) == (21, 3.0 + sum(e["experience"] for e in others))
            assert conflicts_total() == conflicts  # same payload each time: retries, not conflicts

            # The same id reused for another event: accepted by ingest (it keeps no state), ignored
            # by scoring, counted.
            reused = {**event, "experience": 9.5}
            assert (await ingest.post("/v1/events", json=reused)).status_code == 202
            while conflicts_total() - conflicts < 1:
                await asyncio.sleep(0.05)
            assert (await ingest.post("/v1/events", json=event)).status_code == 202  # a plain retry again
            while duplicates_total() - duplicates < 26:
                await asyncio.sleep(0.05)
            assert conflicts_total() - conflicts == 1
            assert await bucket_sums(engine, settings.tenant) == (21, 3.0 + sum(e["experience"] for e in others))
            customer = (await customer_rows(engine, settings.tenant))["c-retry"]
            assert customer.events == 1
        report(
            request, events_sent=27 + 5 * 4, unique_events=21, faults="client retries and a reused event id",
            faults_injected=26, conflicting_payloads_counted=1, events_lost=0, events_double_counted=0,
        )  # fmt: skip
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------------------------
# 7. Overload: ingest bounds the events waiting for the broker and sheds the rest at once.


def pending_events() -> float:
    return REGISTRY.get_sample_value("cem_ingest_pending_events") or 0.0


def ingest_total(result: str, reason: str) -> float:
    return REGISTRY.get_sample_value("cem_ingest_events_total", {"result": result, "reason": reason}) or 0.0


@pytest.mark.timeout(120)
async def test_a_stalled_broker_makes_ingest_shed_with_503_and_retry_after_not_queue(request, postgres):
    broker = EmbeddedKafka()  # this test's own broker: it freezes it
    broker.start()
    settings = make_settings(postgres, broker, ingest_max_pending_events=100, producer_timeout_s=5.0)
    try:
        async with running_ingest(settings) as ingest:
            await eventually(lambda: is_ready(ingest), timeout_s=15)
            shed_before = ingest_total("failed", "overloaded")
            broker.process.send_signal(signal.SIGSTOP)  # a stalled broker: nothing acknowledged
            held = [
                asyncio.create_task(ingest.post("/v1/events:batch", json={"events": [touchpoint() for _ in range(10)]}))
                for _ in range(10)
            ]
            while pending_events() < 100:
                await asyncio.sleep(0.01)
            # Full: more work is refused at once, whatever its size, with a hint when to come back.
            shed_started = time.monotonic()
            shed = await asyncio.gather(
                *(ingest.post("/v1/events", json=touchpoint()) for _ in range(30)),
                *(ingest.post("/v1/events:batch", json={"events": [touchpoint(), touchpoint()]}) for _ in range(20)),
            )
            shed_s = time.monotonic() - shed_started
            assert {response.status_code for response in shed} == {503}
            assert all(response.headers["retry-after"] == "1" for response in shed)
            assert all("overloaded" in response.json()["detail"] for response in shed)
            assert pending_events() == 100  # bounded: nothing queued behind the held requests
            broker.process.send_signal(signal.SIGCONT)
            accepted = await asyncio.gather(*held)
            assert [response.status_code for response in accepted] == [202] * 10
            assert pending_events() == 0
            accepted_ids = sorted(result["event_id"] for r in accepted for result in r.json()["results"])
            assert await topic_event_ids(settings) == accepted_ids  # the shed ones never reached the broker
            shed_counted = ingest_total("failed", "overloaded") - shed_before
        report(
            request, events_sent=100 + 70, faults="broker stalled (SIGSTOP) with ingest full",
            faults_injected=1, accepted=len(accepted_ids), shed_requests=len(shed),
            shed_counted_in_metric=int(shed_counted), seconds_to_answer_50_shed_requests=round(shed_s, 3),
            events_lost=0, events_double_counted=0,
        )  # fmt: skip
        assert shed_s < 2.0  # answered at once, not after a timeout
    finally:
        if broker.process is not None and broker.process.poll() is None:
            broker.process.send_signal(signal.SIGCONT)
        broker.stop()
