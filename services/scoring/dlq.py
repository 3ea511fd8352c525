"""The dead-letter topic: records scoring could not score, replayed to the touchpoint topic once
the cause is fixed (`cem dlq replay`). Scoring drops the event ids it already scored, so
replaying a record twice counts it once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from services.core.kafka import TOUCHPOINT_SCHEMA_HEADER, create_producer
from services.core.settings import Settings

DLQ_HEADERS = ("error", "source_topic", "source_partition", "source_offset")


@dataclass(frozen=True)
class ReplayOutcome:
    read: int  # dead letters read (at most the limit)
    replayed: int  # written to the touchpoint topic (0 in a dry run)
    left: int  # dead letters after those read, up to the end seen at the start


def replay_group(settings: Settings) -> str:
    return f"{settings.scoring_group_id}.dlq-replay"


def describe(record: ConsumerRecord) -> str:
    headers = {key: value.decode(errors="replace") for key, value in record.headers or ()}
    try:
        event_id = orjson.loads(record.value or b"null").get("event_id")
    except (orjson.JSONDecodeError, AttributeError):
        event_id = None
    source = "{}[{}]@{}".format(*(headers.get(name, "?") for name in DLQ_HEADERS[1:]))
    return (
        f"{record.topic}[{record.partition}]@{record.offset} event_id={event_id} from {source}: "
        f"{headers.get('error', '(no error header)')}"
    )


async def replay_dead_letters(
    settings: Settings,
    limit: int | None = None,
    dry_run: bool = False,
    group_id: str | None = None,
    echo: Callable[[str], None] = print,
    read_timeout_s: float = 10.0,
) -> ReplayOutcome:
    """Re-submit the dead letters to the touchpoint topic, oldest first.

    Progress is committed under the replay group: the first run starts at the beginning of the
    DLQ, the next one where the last stopped (another group starts over). Only the records present
    when the run starts are read, so records that fail again and return to the DLQ wait for the
    next run instead of looping. A dry run prints what it would replay and commits nothing.
    """
    group_id = group_id or replay_group(settings)
    # Assigned, not subscribed: the group only keeps the position, no membership to wait for.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id="cem-dlq-replay",
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = None if dry_run else create_producer(settings)
    await consumer.start()
    try:
        if producer is not None:
            await producer.start()
        partitions = [TopicPartition(settings.dlq_topic, p) for p in sorted(await _partitions(consumer, settings))]
        if not partitions:
            echo(f"the DLQ topic {settings.dlq_topic} does not exist: nothing to replay")
            return ReplayOutcome(0, 0, 0)
        consumer.assign(partitions)
        read, starts, ends = await _read_to_end(consumer, partitions, limit, read_timeout_s)
        after = dict(starts)
        for record in read:
            after[TopicPartition(record.topic, record.partition)] = record.offset + 1
        left = sum(max(0, ends[tp] - after[tp]) for tp in partitions)
        waiting = len(read) + left
        for record in read:
            echo(("would replay " if dry_run else "replaying ") + describe(record))
        if dry_run or not read:
            echo(f"{'would replay' if dry_run else 'replayed'} {len(read)} of {waiting} dead letters")
            return ReplayOutcome(len(read), 0, left)
        futures = [
            await producer.send(
                settings.touchpoints_topic,
                key=record.key,
                value=record.value,
                headers=[
                    TOUCHPOINT_SCHEMA_HEADER,
                    ("replayed_from", f"{record.topic}:{record.partition}:{record.offset}".encode()),
                ],
            )
            for record in read
        ]
        await asyncio.gather(*futures)  # acknowledged (acks=all) before the position moves
        committed: dict[TopicPartition, OffsetAndMetadata] = {}
        for record in read:
            committed[TopicPartition(record.topic, record.partition)] = OffsetAndMetadata(record.offset + 1, "")
        await consumer.commit(committed)
        echo(f"replayed {len(read)} of {waiting} dead letters to {settings.touchpoints_topic}")
        return ReplayOutcome(len(read), len(read), left)
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()


async def _read_to_end(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], limit: int | None, timeout_s: float
) -> tuple[list[ConsumerRecord], dict[TopicPartition, int], dict[TopicPartition, int]]:
    """The records from the group's position up to the end seen at the start (at most `limit`),
    the position each partition started from, and that end.

    The end is the larger of end_offsets() and the first high watermark a fetch reports: tansu
    (the dev broker) answers ListOffsets(latest) with the last record batch's base offset + 1, not
    the end of the log, when a producer wrote several records in one batch.
    """
    ends = await consumer.end_offsets(partitions)
    positions = {tp: await consumer.position(tp) for tp in partitions}
    starts = dict(positions)
    seen_highwater: set[TopicPartition] = set()
    read: list[ConsumerRecord] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while limit is None or len(read) < limit:
        pending = [tp for tp in partitions if tp not in seen_highwater or positions[tp] < ends[tp]]
        if not pending:
            break
        if loop.time() > deadline:
            raise TimeoutError(f"the DLQ was not read to its end in {timeout_s} s ({len(read)} records read)")
        fetched = await consumer.getmany(*pending, timeout_ms=200)
        for tp in pending:
            highwater = consumer.highwater(tp)
            if highwater is not None and tp not in seen_highwater:
                seen_highwater.add(tp)
                ends[tp] = max(ends[tp], highwater)
        for tp, records in sorted(fetched.items(), key=lambda item: item[0].partition):
            for record in records:
                if record.offset < ends[tp] and (limit is None or len(read) < limit):
                    read.append(record)
            positions[tp] = await consumer.position(tp)
    return read, starts, ends


async def _partitions(consumer: AIOKafkaConsumer, settings: Settings) -> set[int]:
    await consumer.topics()  # fetches the metadata partitions_for_topic reads
    return consumer.partitions_for_topic(settings.dlq_topic) or set()
