"""The scoring consumer: reads touchpoint records, scores each batch in one Postgres transaction,
resumes from the offsets stored in Postgres on start and on every rebalance."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import metrics
from services.core.events import TouchpointRecord
from services.core.journeys import Journey
from services.core.kafka import create_consumer, create_producer
from services.core.scoring import HalfLives, ScoredEvent
from services.core.settings import Settings
from services.scoring.store import (
    BatchOutcome,
    PartitionRange,
    ScoringContext,
    StaleOffsets,
    TenantEvent,
    load_offsets,
    score_batch,
)

log = logging.getLogger("cem.scoring")

# Called inside the batch transaction after the aggregates are updated (alert evaluation).
AfterBatch = Callable[[object, BatchOutcome], Awaitable[None]]


def to_scored_event(record: TouchpointRecord) -> ScoredEvent:
    return ScoredEvent(
        event_id=record.event_id,
        customer_id=record.customer_id,
        journey=record.journey,
        stage=record.stage,
        touchpoint=record.touchpoint or "",
        channel=record.channel or "",
        occurred_s=record.occurred_at.timestamp(),
        experience=record.experience,
        expectation=record.expectation,
        promise=record.promise,
        weight=record.weight,
        emotion=record.emotion,
        revenue=record.revenue or 0.0,
    )


@dataclass(frozen=True)
class PoisonRecord:
    record: ConsumerRecord
    reason: str


def decode(record: ConsumerRecord) -> TenantEvent | PoisonRecord:
    try:
        if record.value is None:
            raise ValueError("record has no value")
        touchpoint = TouchpointRecord.model_validate_json(record.value)
    except (ValidationError, ValueError) as error:
        return PoisonRecord(record, f"undecodable touchpoint record: {str(error)[:500]}")
    return TenantEvent(touchpoint.tenant, to_scored_event(touchpoint), touchpoint.received_at.timestamp())


class _ResumeFromStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    async def on_partitions_revoked(self, revoked):
        # Nothing to flush: every batch is committed (with its offsets) before the next poll.
        async with self.scorer.batch_lock:
            for partition in revoked:
                self.scorer.stored_offsets.pop(partition, None)

    async def on_partitions_assigned(self, assigned):
        async with self.scorer.batch_lock:
            await self.scorer.resume(list(assigned))


class Scorer:
    """Owns the consumer loop. `run()` until `stop()`; a SIGKILL at any point loses nothing:
    the aggregates and the offsets move together or not at all."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        journeys: dict[str, Journey],
        after_batch: AfterBatch | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.context = ScoringContext(
            group_id=settings.scoring_group_id,
            half_lives=HalfLives(
                index_s=settings.customer_half_life_s,
                trend_s=settings.trend_half_life_s,
                revenue_s=settings.revenue_half_life_s,
            ),
            journeys=journeys,
        )
        self.after_batch = after_batch
        self.batch_lock = asyncio.Lock()
        self.stored_offsets: dict[TopicPartition, int | None] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self.running = False
        self.last_error: str | None = None
        self.batches = 0

    async def resume(self, partitions: list[TopicPartition]) -> None:
        """Seek each assigned partition to the offset stored with the aggregates."""
        if not partitions:
            return
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        async with self.engine.begin() as conn:
            for topic, numbers in by_topic.items():
                stored = await load_offsets(conn, self.settings.scoring_group_id, topic, numbers)
                for number in numbers:
                    tp = TopicPartition(topic, number)
                    self.stored_offsets[tp] = stored.get(number)
        for tp in partitions:
            offset = self.stored_offsets.get(tp)
            if offset is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        log.info("resumed %s", {f"{tp.topic}[{tp.partition}]": self.stored_offsets.get(tp) for tp in partitions})

    async def run(self) -> None:
        self.consumer = create_consumer(self.settings)
        self.producer = create_producer(self.settings)
        await self._start_clients()
        self.consumer.subscribe([self.settings.touchpoints_topic], listener=_ResumeFromStoredOffsets(self))
        self.running = True
        try:
            while not self._stopping.is_set():
                batch = await self.consumer.getmany(
                    timeout_ms=self.settings.scoring_poll_timeout_ms, max_records=self.settings.scoring_max_batch
                )
                if batch:
                    await self._process_with_retry(batch)
                self._export_lag()
        finally:
            self.running = False
            await self.consumer.stop()
            await self.producer.stop()

    async def _start_clients(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            try:
                await self.producer.start()
                await self.consumer.start()
                return
            except Exception as error:  # broker not up yet: keep trying, say why
                self.last_error = f"broker unavailable: {error}"
                log.warning("scoring cannot reach the broker (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def stop(self) -> None:
        self._stopping.set()

    async def _process_with_retry(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        delay = 0.1
        while True:
            try:
                async with self.batch_lock:
                    await self._process(batch)
                self.last_error = None
                return
            except StaleOffsets as error:
                # Another consumer committed these partitions: drop the batch and re-seek.
                metrics.SCORING_FAILURES.labels("stale_offsets").inc()
                log.warning("%s; re-reading stored offsets", error)
                async with self.batch_lock:
                    await self.resume([tp for tp in batch if tp in self.consumer.assignment()])
                return
            except (OperationalError, DBAPIError, OSError, asyncio.TimeoutError) as error:
                # Database down or a deadlock: nothing was committed, offsets did not move. Retry
                # the same batch; if the partitions were revoked meanwhile, drop it (the new owner
                # resumes from the stored offsets).
                metrics.SCORING_FAILURES.labels(type(error).__name__).inc()
                self.last_error = f"database unavailable: {str(error)[:300]}"
                log.warning("scoring batch failed (%s); retrying in %.1f s", self.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                if self._stopping.is_set():
                    return
                batch = {tp: records for tp, records in batch.items() if tp in self.consumer.assignment()}
                if not batch:
                    return

    async def _process(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        started = time.perf_counter()
        batch_id = uuid.uuid4().hex[:12]
        events: list[TenantEvent] = []
        poison: list[PoisonRecord] = []
        ranges: list[PartitionRange] = []
        for tp, records in sorted(batch.items(), key=lambda item: item[0].partition):
            if tp not in self.stored_offsets:
                continue  # revoked while we were polling
            for record in records:
                decoded = decode(record)
                (poison if isinstance(decoded, PoisonRecord) else events).append(decoded)
            ranges.append(PartitionRange(tp.topic, tp.partition, self.stored_offsets[tp], records[-1].offset + 1))
        if not ranges:
            return
        # Poison records are on the DLQ (acknowledged) before their offsets are committed.
        await self._send_to_dlq(poison)

        now = time.time()
        async with self.engine.begin() as conn:
            outcome = await score_batch(conn, events, ranges, self.context, datetime.fromtimestamp(now, timezone.utc))
            if self.after_batch is not None:
                await self.after_batch(conn, outcome)
        committed = time.time()
        for item in ranges:
            self.stored_offsets[TopicPartition(item.topic, item.partition)] = item.next_offset
        # Kafka's own committed offsets are informational (lag tools); Postgres is the truth.
        try:
            await self.consumer.commit({TopicPartition(r.topic, r.partition): r.next_offset for r in ranges})
        except Exception as error:  # a rebalance in progress: harmless, the next batch commits again
            log.debug("kafka offset commit skipped: %s", error)

        metrics.SCORING_EVENTS.labels("scored").inc(len(outcome.scored))
        metrics.SCORING_EVENTS.labels("duplicate").inc(outcome.duplicates)
        metrics.SCORING_EVENTS.labels("dlq").inc(len(poison))
        metrics.SCORING_BATCH_EVENTS.observe(len(events) + len(poison))
        metrics.SCORING_BATCH_DURATION.observe(time.perf_counter() - started)
        for item in outcome.scored:
            metrics.EVENT_TO_SCORE.observe(max(0.0, committed - item.received_s))
        self.batches += 1
        log.info(
            "batch %s: %d records, %d scored, %d duplicate, %d dlq, %d quadrant changes, %.1f ms",
            batch_id, len(events) + len(poison), len(outcome.scored), outcome.duplicates, len(poison),
            len(outcome.quadrant_changes), (time.perf_counter() - started) * 1000,
        )  # fmt: skip

    async def _send_to_dlq(self, poison: list[PoisonRecord]) -> None:
        if not poison:
            return
        futures = [
            await self.producer.send(
                self.settings.dlq_topic,
                key=item.record.key,
                value=item.record.value,
                headers=[
                    ("error", item.reason.encode()),
                    ("source_topic", item.record.topic.encode()),
                    ("source_partition", str(item.record.partition).encode()),
                    ("source_offset", str(item.record.offset).encode()),
                ],
            )
            for item in poison
        ]
        await asyncio.gather(*futures)

    def _export_lag(self) -> None:
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            position = self.stored_offsets.get(tp)
            if highwater is not None and position is not None:
                metrics.SCORING_LAG.labels(str(tp.partition)).set(max(0, highwater - position))
