"""The scoring consumer: reads touchpoint records, scores each batch in one Postgres transaction,
resumes from the offsets stored in Postgres on start and on every rebalance, and sends the records
that cannot be scored to the dead-letter topic."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import metrics
from services.core.events import CUSTOMER_ID_PATTERN, EVENT_ID_PATTERN, TouchpointRecord
from services.core.db.journeys import JourneyLoader
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
Batch = dict[TopicPartition, list[ConsumerRecord]]
Decoded = dict[tuple[TopicPartition, int], "TenantEvent | PoisonRecord"]

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# SQLSTATE classes that say "this data cannot be stored" (22 data exception, 23 integrity
# violation, 54 program limit such as an index row too large). Any other failure (connection,
# deadlock, a missing column after a bad deploy, a bug) is retried and never sent to the DLQ:
# diverting on a bug would empty the stream into the DLQ.
POISON_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})
# Fields hashed to tell a client's retry (same payload) from a conflicting reuse of an event id.
# Not received_at (differs per retry), nor tenant (part of the key).
PAYLOAD_FIELDS = (
    "event_id", "occurred_at", "customer_id", "journey", "stage", "touchpoint", "channel", "source",
    "experience", "expectation", "emotion", "revenue", "attributes",
)  # fmt: skip

_EVENT_ID = re.compile(EVENT_ID_PATTERN)
_CUSTOMER_ID = re.compile(CUSTOMER_ID_PATTERN)


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


def payload_hash(record: TouchpointRecord) -> bytes:
    """16 bytes that differ when two records with one event id carry different content."""
    # The fields as parsed (what model_dump(mode="json") gives for them, without its cost).
    content = {name: getattr(record, name) for name in PAYLOAD_FIELDS}
    content["occurred_at"] = record.occurred_at.astimezone(timezone.utc).isoformat()
    return hashlib.blake2b(orjson.dumps(content, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


@dataclass(frozen=True)
class PoisonRecord:
    record: ConsumerRecord
    reason: str


def _record_problem(touchpoint: TouchpointRecord, settings: Settings | None) -> str | None:
    """What ingest would have refused, checked again: a record may come from anywhere."""
    if not _EVENT_ID.match(touchpoint.event_id):
        return "event_id must be 1-64 characters of A-Z a-z 0-9 _ . : -"
    if not _CUSTOMER_ID.match(touchpoint.customer_id):
        return "customer_id must be 1-128 printable characters"
    if touchpoint.occurred_at.tzinfo is None or touchpoint.received_at.tzinfo is None:
        return "occurred_at and received_at need a UTC offset"
    if settings is not None:
        # Outside the window ingest accepts, the decay weights over- or underflow.
        age_s = (touchpoint.received_at - touchpoint.occurred_at).total_seconds()
        slack_s = 60.0  # ingest reads its clock more than once per event
        if not -settings.max_future_skew_s - slack_s <= age_s <= settings.max_event_age_s + slack_s:
            return f"occurred_at is {age_s:.0f} s before received_at, outside the accepted window"
    return None


def decode(record: ConsumerRecord, settings: Settings | None = None) -> TenantEvent | PoisonRecord:
    try:
        if record.value is None:
            raise ValueError("record has no value")
        touchpoint = TouchpointRecord.model_validate_json(record.value)
    except (ValidationError, ValueError) as error:
        return PoisonRecord(record, f"undecodable touchpoint record: {str(error)[:500]}")
    problem = _record_problem(touchpoint, settings)
    if problem is not None:
        return PoisonRecord(record, f"invalid touchpoint record: {problem}")
    return TenantEvent(
        touchpoint.tenant, to_scored_event(touchpoint), touchpoint.received_at.timestamp(), payload_hash(touchpoint)
    )


def is_poison_failure(error: BaseException) -> bool:
    """True if Postgres refused the data itself, so that retrying the same records cannot help."""
    if not isinstance(error, DBAPIError):
        return False
    sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in POISON_SQLSTATE_CLASSES


def _failure_kind(error: BaseException) -> str:
    """The reason label of a retried failure: few values, whatever the exception."""
    if isinstance(error, KafkaError):
        return "broker"
    if isinstance(error, (DBAPIError, OSError, asyncio.TimeoutError)):
        return "database"
    return "error"


def _split(batch: Batch) -> tuple[Batch, Batch]:
    """Two halves, each partition's records kept in offset order; the first half holds the
    lower offsets of every partition it shares with the second, so committing it first keeps
    the stored offsets moving forward."""
    flat = [(tp, record) for tp, records in batch.items() for record in records]
    middle = len(flat) // 2
    halves: tuple[Batch, Batch] = ({}, {})
    for index, (tp, record) in enumerate(flat):
        halves[index >= middle].setdefault(tp, []).append(record)
    return halves


def without_committed(polled: Batch, scored: Batch, stored_offsets: dict[TopicPartition, int | None]) -> Batch:
    """`polled` less the records of `scored` that were committed while it was being polled.

    A poll that runs while a batch is scored can return that batch's records again: aiokafka may
    have fetched them twice, once before and once after a seek to the stored offsets on
    assignment. Scoring them again would lose nothing (their event ids are dropped as
    duplicates), but their poison records would go to the DLQ a second time. A record is only
    dropped if it is the same record (partition, offset and bytes) and its offset is now below the
    stored offset, so records of a topic recreated with the same offsets are still read."""
    kept: Batch = {}
    for tp, records in polled.items():
        stored = stored_offsets.get(tp)
        scored_values = {record.offset: record.value for record in scored.get(tp, ())}
        if stored is not None and scored_values:
            records = [
                record
                for record in records
                if not (
                    record.offset < stored
                    and record.offset in scored_values
                    and scored_values[record.offset] == record.value
                )
            ]
        if records:
            kept[tp] = records
    return kept


def _size(batch: Batch) -> int:
    return sum(len(records) for records in batch.values())


class _ResumeFromStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    async def on_partitions_revoked(self, revoked):
        # Nothing to flush: a batch being scored holds batch_lock until it is committed with its
        # offsets, and a batch polled but not yet scored skips revoked partitions (_ranges).
        async with self.scorer.batch_lock:
            for partition in revoked:
                self.scorer.stored_offsets.pop(partition, None)
                self.scorer.unresumed.discard(partition)

    async def on_partitions_assigned(self, assigned):
        async with self.scorer.batch_lock:
            await self.scorer.take_over(list(assigned))


class Scorer:
    """Owns the consumer loop. `run()` until `stop()`; a SIGKILL at any point loses nothing:
    the aggregates and the offsets move together or not at all."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        journeys: JourneyLoader,
        after_batch: AfterBatch | None = None,
        name: str = "consumer-0",
    ):
        self.settings = settings
        self.name = name  # in logs and /readyz: a process may run several (Settings.scoring_consumers)
        self.engine = engine
        self.journeys = journeys
        self.context = ScoringContext(
            group_id=settings.scoring_group_id,
            half_lives=HalfLives(
                index_s=settings.customer_half_life_s,
                trend_s=settings.trend_half_life_s,
                revenue_s=settings.revenue_half_life_s,
            ),
            journeys=journeys.catalog,
        )
        self.after_batch = after_batch
        self.batch_lock = asyncio.Lock()
        self.stored_offsets: dict[TopicPartition, int | None] = {}
        # Assigned, but their stored offsets could not be read (database down): paused until they are.
        self.unresumed: set[TopicPartition] = set()
        self._resume_backoff_s = FIRST_BACKOFF_S
        self._next_resume_attempt = 0.0
        # (topic, partition, offset) already on the DLQ while their batch is retried or split.
        self._dead_lettered: set[tuple[str, int, int]] = set()
        self._gap_seeks: dict[TopicPartition, int] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self.running = False
        # True once run() returned because of stop(), with no batch left half done.
        self.drained = False
        self.last_error: str | None = None
        self.batches = 0

    async def resume(self, partitions: list[TopicPartition]) -> None:
        """Seek each assigned partition to the offset stored with the aggregates."""
        if not partitions:
            return
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        loaded: dict[TopicPartition, int | None] = {}
        async with self.engine.begin() as conn:
            for topic, numbers in by_topic.items():
                stored = await load_offsets(conn, self.settings.scoring_group_id, topic, numbers)
                for number in numbers:
                    loaded[TopicPartition(topic, number)] = stored.get(number)
        self.stored_offsets.update(loaded)
        for tp in partitions:
            # seek(0), not seek_to_beginning(): the latter resets asynchronously and races aiokafka's
            # own initial positioning (seen: a partition delivered twice). If retention removed
            # offset 0, the fetch is out of range and auto_offset_reset=earliest finds the start.
            self.consumer.seek(tp, self.stored_offsets.get(tp) or 0)
        positions = {f"{tp.topic}[{tp.partition}]": self.stored_offsets.get(tp) for tp in partitions}
        log.info("%s resumed %s", self.name, positions)

    async def take_over(self, partitions: list[TopicPartition]) -> None:
        """Resume newly assigned partitions; if the database is down, pause them until it is back
        (reading them from anywhere else than the stored offsets could skip records)."""
        try:
            await self.resume(partitions)
        except Exception as error:  # noqa: BLE001 - aiokafka would swallow it and fetch from elsewhere
            self.last_error = f"database unavailable: cannot read the stored offsets: {str(error)[:300]}"
            paused = sorted(tp.partition for tp in partitions)
            log.warning("%s: %s; partitions %s paused", self.name, self.last_error, paused)
            for tp in partitions:
                self.stored_offsets.pop(tp, None)
            self.consumer.pause(*partitions)
            self.unresumed.update(partitions)
            self._next_resume_attempt = time.monotonic() + self._resume_backoff_s
            self._resume_backoff_s = min(self._resume_backoff_s * 2, MAX_BACKOFF_S)

    async def _retry_unresumed(self) -> None:
        if not self.unresumed or time.monotonic() < self._next_resume_attempt:
            return
        async with self.batch_lock:
            partitions = [tp for tp in self.unresumed if tp in self.consumer.assignment()]
            self.unresumed.clear()
            await self.take_over(partitions)
            resumed = [tp for tp in partitions if tp not in self.unresumed]
            if resumed:
                self.consumer.resume(*resumed)
            if not self.unresumed:
                self._resume_backoff_s = FIRST_BACKOFF_S
                self.last_error = None

    async def run(self) -> None:
        self.consumer = create_consumer(self.settings)
        self.producer = create_producer(self.settings)
        await self._start_clients()
        self.consumer.subscribe([self.settings.touchpoints_topic], listener=_ResumeFromStoredOffsets(self))
        self.running = True
        poll_backoff_s = FIRST_BACKOFF_S
        drained = True
        # The batch being scored, while the next one is polled and decoded: decoding is pure and
        # a third of the process's work, so it fills the time spent waiting for Postgres. Batches
        # are still scored and committed one after the other, in order.
        scoring: asyncio.Task[bool] | None = None
        scored: Batch = {}
        try:
            while not self._stopping.is_set():
                await self._retry_unresumed()
                try:
                    batch = await self.consumer.getmany(
                        timeout_ms=self.settings.scoring_poll_timeout_ms, max_records=self.settings.scoring_max_batch
                    )
                except KafkaError as error:  # the broker went away mid-poll: keep the loop alive
                    self.last_error = f"broker unavailable: {error!r}"
                    log.warning("%s: poll failed (%s); retrying in %.1f s", self.name, self.last_error, poll_backoff_s)
                    await asyncio.sleep(poll_backoff_s)
                    poll_backoff_s = min(poll_backoff_s * 2, MAX_BACKOFF_S)
                    continue
                poll_backoff_s = FIRST_BACKOFF_S
                decoded = await self._decode_ahead(batch)
                if scoring is not None:
                    drained = await scoring
                    scoring = None
                    if self._stopping.is_set():
                        break  # the batch just polled was not started: it is read again on restart
                    polled = _size(batch)
                    batch = without_committed(batch, scored, self.stored_offsets)
                    if _size(batch) < polled:
                        log.info("%d records polled again after their batch committed: dropped", polled - _size(batch))
                if batch:
                    scored = batch
                    scoring = asyncio.create_task(self._process_with_retry(batch, decoded))
                self._export_lag()
            if scoring is not None:
                drained = await scoring
            self.drained = drained
        finally:
            if scoring is not None and not scoring.done():
                # run() itself was cancelled: so is the batch (its transaction rolls back), before
                # the clients stop under it.
                scoring.cancel()
                await asyncio.gather(scoring, return_exceptions=True)
            self.running = False
            log.info("scoring %s stopping after %d batches; drained: %s", self.name, self.batches, self.drained)
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

    async def _decode_ahead(self, batch: Batch) -> Decoded:
        """Every record of `batch` decoded, a hundred at a time so that the batch being scored
        meanwhile gets its Postgres answers without waiting for all of them."""
        decoded: Decoded = {}
        for tp, records in batch.items():
            for record in records:
                decoded[(tp, record.offset)] = decode(record, self.settings)
                if len(decoded) % 100 == 0:
                    await asyncio.sleep(0)
        return decoded

    async def _process_with_retry(self, batch: Batch, decoded: Decoded) -> bool:
        """Commit the batch, retrying transient failures with backoff; a batch Postgres refuses is
        split until the records it refuses are alone, and those go to the DLQ. Returns False if
        stopped before the batch was committed (nothing of it was)."""
        batch = await self._without_gaps(batch)
        pending: list[Batch] = [batch] if batch else []  # in order: a partition's lower offsets come first
        refused: dict[tuple[str, int, int], int] = {}
        delay = FIRST_BACKOFF_S
        try:
            while pending:
                part = pending[0]
                try:
                    async with self.batch_lock:
                        await self._process(part, decoded)
                    pending.pop(0)
                    delay = FIRST_BACKOFF_S
                    self.last_error = None
                    continue
                except StaleOffsets as error:
                    # Another consumer committed these partitions: drop the batch and re-seek.
                    metrics.SCORING_FAILURES.labels("stale_offsets").inc()
                    log.warning("%s; re-reading stored offsets", error)
                    async with self.batch_lock:
                        await self.take_over([tp for tp in batch if tp in self.consumer.assignment()])
                    return True
                except Exception as error:  # noqa: BLE001 - sorted below: poison, or retried
                    if is_poison_failure(error):
                        if _size(part) > 1:
                            pending[0:1] = [half for half in _split(part) if half]
                            continue
                        [(tp, [record])] = part.items()
                        key = (tp.topic, tp.partition, record.offset)
                        refused[key] = refused.get(key, 0) + 1
                        if refused[key] >= 2:  # refused alone twice: the record, not a race
                            reason = f"Postgres refused the record: {str(error.orig)[:400]}"
                            async with self.batch_lock:
                                await self._divert(tp, record, reason)
                            pending.pop(0)
                            continue
                    else:
                        kind = _failure_kind(error)
                        metrics.SCORING_FAILURES.labels(kind).inc()
                        self.last_error = f"scoring batch failed ({kind} unavailable): {str(error)[:300]}"
                        if kind == "error":  # neither outage: a bug, or a deploy that missed a migration
                            self.last_error = f"scoring batch failed: {type(error).__name__}: {str(error)[:300]}"
                        # Nothing was committed, offsets did not move: retry the same records.
                        log.warning("%s; retrying in %.1f s", self.last_error, delay)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, MAX_BACKOFF_S)
                if self._stopping.is_set():
                    return False
                # If partitions were revoked meanwhile, drop their records: the new owner resumes
                # from the stored offsets.
                assignment = self.consumer.assignment()
                pending = [
                    kept for kept in ({tp: r for tp, r in part.items() if tp in assignment} for part in pending) if kept
                ]
            return True
        finally:
            self._dead_lettered.clear()

    async def _without_gaps(self, batch: Batch) -> Batch:
        """Drop the records of a partition that start past its stored offset, and seek back: scoring
        them would store an offset beyond records never read. Accepted if the broker deleted the
        missing records (retention), or if the same gap shows again after the seek (offsets that
        hold no record: transaction markers, compaction)."""
        kept: Batch = {}
        for tp, records in batch.items():
            stored = self.stored_offsets.get(tp)
            if stored is None or not records or records[0].offset <= stored:
                kept[tp] = records
                continue
            log_start = (await self.consumer.beginning_offsets([tp]))[tp]
            if log_start > stored:
                log.error(
                    "%s[%d]: offsets %d to %d were deleted by the broker before they were scored",
                    tp.topic, tp.partition, stored, log_start - 1,
                )  # fmt: skip
                kept[tp] = records
            elif self._gap_seeks.get(tp) == stored:
                kept[tp] = records
            else:
                log.warning(
                    "%s[%d]: records from offset %d, past the stored offset %d: seeking back",
                    tp.topic, tp.partition, records[0].offset, stored,
                )  # fmt: skip
                self._gap_seeks[tp] = stored
                self.consumer.seek(tp, stored)
        return kept

    def _ranges(self, batch: Batch) -> list[PartitionRange]:
        ranges = []
        for tp, records in sorted(batch.items(), key=lambda item: item[0].partition):
            if tp not in self.stored_offsets or not records:
                continue  # revoked while we were polling
            stored = self.stored_offsets[tp]
            if stored is not None and records[0].offset < stored:
                # Records delivered again after a seek (an aiokafka race), or a topic recreated
                # empty (the memory-only dev broker after a restart): score them again, the event
                # ids drop what was scored, and the stored offset follows what was read.
                log.info(
                    "%s[%d]: records from offset %d, below the stored offset %d: read again",
                    tp.topic, tp.partition, records[0].offset, stored,
                )  # fmt: skip
            ranges.append(PartitionRange(tp.topic, tp.partition, stored, records[-1].offset + 1))
        return ranges

    async def _process(self, batch: Batch, decoded: Decoded) -> None:
        started = time.perf_counter()
        batch_id = uuid.uuid4().hex[:12]
        ranges = self._ranges(batch)
        if not ranges:
            return
        owned = {(item.topic, item.partition) for item in ranges}
        events: list[TenantEvent] = []
        poison: list[PoisonRecord] = []
        for tp, records in batch.items():
            if (tp.topic, tp.partition) in owned:
                for record in records:
                    item = decoded[(tp, record.offset)]  # every record of the polled batch
                    (poison if isinstance(item, PoisonRecord) else events).append(item)
        # Poison records are on the DLQ (acknowledged) before their offsets are committed.
        await self._send_to_dlq(poison)

        now = time.time()
        async with self.engine.begin() as conn:
            # The tenants' own journey maps: read here once (scoring must not judge by maps it has
            # not read); the scoring app's journey-maps task keeps them fresh from then on.
            if not self.journeys.catalog.loaded:
                await self.journeys.refresh(conn)
            outcome = await score_batch(conn, events, ranges, self.context, datetime.fromtimestamp(now, timezone.utc))
            if self.after_batch is not None:
                await self.after_batch(conn, outcome)
        committed = time.time()
        await self._committed(ranges)

        metrics.SCORING_EVENTS.labels("scored").inc(len(outcome.scored))
        metrics.SCORING_EVENTS.labels("duplicate").inc(outcome.duplicates)
        metrics.SCORING_EVENTS.labels("dlq").inc(len(poison))
        metrics.SCORING_DUPLICATES_CONFLICTING.inc(outcome.conflicting)
        metrics.SCORING_BATCH_EVENTS.observe(len(events) + len(poison))
        metrics.SCORING_BATCH_DURATION.observe(time.perf_counter() - started)
        for item in outcome.scored:
            metrics.EVENT_TO_SCORE.observe(max(0.0, committed - item.received_s))
        self.batches += 1
        if outcome.conflicting:
            log.warning(
                "batch %s: %d records reused a scored event id with a different payload; ignored",
                batch_id, outcome.conflicting,
            )  # fmt: skip
        log.info(
            "batch %s: %d records, %d scored, %d duplicate, %d dlq, %d quadrant changes, %.1f ms",
            batch_id, len(events) + len(poison), len(outcome.scored), outcome.duplicates, len(poison),
            len(outcome.quadrant_changes), (time.perf_counter() - started) * 1000,
        )  # fmt: skip

    async def _divert(self, tp: TopicPartition, record: ConsumerRecord, reason: str) -> None:
        """Send one record Postgres refuses to the DLQ, then move its partition past it."""
        ranges = self._ranges({tp: [record]})
        if not ranges:
            return
        await self._send_to_dlq([PoisonRecord(record, reason)])
        async with self.engine.begin() as conn:
            await score_batch(conn, [], ranges, self.context, datetime.now(timezone.utc))
        await self._committed(ranges)
        metrics.SCORING_EVENTS.labels("dlq").inc()
        log.warning("%s[%d] offset %d sent to the DLQ: %s", tp.topic, tp.partition, record.offset, reason)

    async def _committed(self, ranges: list[PartitionRange]) -> None:
        for item in ranges:
            tp = TopicPartition(item.topic, item.partition)
            self.stored_offsets[tp] = item.next_offset
            # A getmany() that ran while the rebalance listener sought to the stored offset returns
            # records from before the seek: once they are committed, skip the re-delivery the seek
            # would cause (it would be dropped by event id, but costs a batch and re-sends poison).
            if tp in self.consumer.assignment() and await self.consumer.position(tp) < item.next_offset:
                self.consumer.seek(tp, item.next_offset)
        # Kafka's own committed offsets are informational (lag tools); Postgres is the truth.
        try:
            await self.consumer.commit({TopicPartition(r.topic, r.partition): r.next_offset for r in ranges})
        except Exception as error:  # a rebalance in progress: harmless, the next batch commits again
            log.debug("kafka offset commit skipped: %s", error)

    async def _send_to_dlq(self, poison: list[PoisonRecord]) -> None:
        # A batch retried or split would send its poison again: once is enough.
        fresh = [item for item in poison if self._dead_letter_key(item) not in self._dead_lettered]
        if not fresh:
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
            for item in fresh
        ]
        await asyncio.gather(*futures)
        self._dead_lettered.update(self._dead_letter_key(item) for item in fresh)

    @staticmethod
    def _dead_letter_key(item: PoisonRecord) -> tuple[str, int, int]:
        return (item.record.topic, item.record.partition, item.record.offset)

    def _export_lag(self) -> None:
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            position = self.stored_offsets.get(tp)
            if highwater is not None and position is not None:
                metrics.SCORING_LAG.labels(str(tp.partition)).set(max(0, highwater - position))
