"""Ingest's link to Kafka: the producer started and kept ready in the background, and the writes."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import lru_cache

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from services.core.deadlines import Deadlines
from services.core.events import EncodedRecord
from services.core.kafka import TOUCHPOINT_SCHEMA_HEADER, create_producer, ensure_topics
from services.core.metrics import INGEST_PENDING_EVENTS, INGEST_PRODUCE_DURATION
from services.core.settings import Settings

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 2.0
CONNECT_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 2.0
# Requests of at most this many records share the producer's batches with other requests; larger
# ones build batches of their own (one per partition), which costs less per record.
SHARED_BATCH_RECORDS = 16
PARTITION_CACHE_KEYS = 100_000  # ~20 MB at most; a customer's events keep hitting its entry


@lru_cache(maxsize=PARTITION_CACHE_KEYS)
def _key_hash(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF


def partition_for(key: bytes, partitions: list[int]) -> int:
    """The partition aiokafka's DefaultPartitioner picks for a key (the Java client's murmur2, so
    the same as any Kafka client), with the pure-Python hash computed once per key.
    `partitions`: all the topic's partitions, sorted."""
    return partitions[_key_hash(key) % len(partitions)]


class BrokerUnavailable(Exception):
    """The broker is not connected or did not acknowledge in time: the client may retry."""


class Overloaded(Exception):
    """Too many events wait for the broker's acknowledgement: shed the request, the client may retry."""


class TouchpointProducer:
    """Owns the Kafka producer. `run()` (a background task) creates the topics and starts the
    producer, retrying with backoff, so the service starts and answers 503 while the broker is down."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._deadlines = Deadlines(settings.producer_timeout_s)
        # The gauge reads the count when scraped: no lock taken twice per request to set it.
        INGEST_PENDING_EVENTS.set_function(lambda: self.pending_events)
        self._producer: AIOKafkaProducer | None = None
        # Set when a write or a readiness check failed: `run()` then checks the topics again,
        # because a broker that restarted empty (the dev broker keeps topics in memory) lost them.
        self._trouble = asyncio.Event()
        # Events handed to the producer and not yet acknowledged (or failed): the bound on the
        # work and memory ingest holds for a slow broker.
        self.pending_events = 0

    @property
    def started(self) -> bool:
        return self._producer is not None

    @property
    def saturated(self) -> bool:
        return self.pending_events >= self._settings.ingest_max_pending_events

    async def run(self) -> None:
        backoff_s = FIRST_BACKOFF_S
        while True:
            try:
                await asyncio.wait_for(ensure_topics(self._settings), CONNECT_TIMEOUT_S)
                if self._producer is None:
                    self._producer = await self._start_producer()
                    log.info("producer connected to %s", self._settings.kafka_bootstrap_servers)
            except Exception as error:  # whatever the broker or the network does, retry: never give up
                log.warning(
                    "broker %s unavailable (%r); retrying in %.2f s",
                    self._settings.kafka_bootstrap_servers, error, backoff_s,
                )  # fmt: skip
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                continue
            backoff_s = FIRST_BACKOFF_S
            await self._trouble.wait()
            self._trouble.clear()

    async def _start_producer(self) -> AIOKafkaProducer:
        # A producer cannot be started twice: every attempt uses a fresh one.
        producer = create_producer(self._settings)
        try:
            await asyncio.wait_for(producer.start(), CONNECT_TIMEOUT_S)
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def send_all(self, records: list[EncodedRecord]) -> None:
        """Write the records and wait until the broker acknowledged every one.

        Raises BrokerUnavailable if any write failed or all took longer than producer_timeout_s; some
        may have been written then, which is safe: scoring drops duplicate event ids. Raises
        Overloaded, before writing any, if the records would take the pending events past
        ingest_max_pending_events (a request is always admitted when nothing is pending).
        """
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable("the producer is not connected yet")
        limit = self._settings.ingest_max_pending_events
        if self.pending_events and self.pending_events + len(records) > limit:
            raise Overloaded(f"{self.pending_events} events wait for the broker (at most {limit})")
        self.pending_events += len(records)
        try:
            await self._send_all(producer, records)
        finally:
            self.pending_events -= len(records)

    async def _send_all(self, producer: AIOKafkaProducer, records: list[EncodedRecord]) -> None:
        started = time.perf_counter()
        topic = self._settings.touchpoints_topic
        deliveries: list[asyncio.Future] = []
        try:
            # One deadline for the whole request (it covers waiting for metadata and for room in
            # the producer's queue too), not a timer and a task per record.
            async with self._deadlines.within():
                partitions = sorted(await producer.partitions_for(topic))
                if len(records) <= SHARED_BATCH_RECORDS:
                    # A few records join the producer's open batches, shared with other requests:
                    # one round trip to the broker then carries many single-event requests.
                    for record in records:
                        deliveries.append(await producer.send(
                            topic, record.value, key=record.key, partition=partition_for(record.key, partitions),
                            headers=[TOUCHPOINT_SCHEMA_HEADER],
                        ))  # fmt: skip
                else:
                    for partition, batch in _batches(producer, partitions, records):
                        deliveries.append(await producer.send_batch(batch, topic, partition=partition))
                for delivery in deliveries:
                    # If this request gives up first, a later failure is not "never retrieved".
                    delivery.add_done_callback(_retrieve)
                if len(deliveries) == 1:  # one event: no gathering future and its callbacks
                    await deliveries[0]
                else:
                    await asyncio.gather(*deliveries)
        except (KafkaError, TimeoutError) as error:
            self._trouble.set()
            raise BrokerUnavailable(f"writing {len(records)} records failed: {error!r}") from None
        INGEST_PRODUCE_DURATION.observe(time.perf_counter() - started)

    async def not_ready_reason(self) -> str | None:
        """None if the producer is started and the broker serves the topic's metadata, else why not."""
        producer = self._producer
        if producer is None:
            return "the Kafka producer is not started: the broker was unreachable so far"
        topic = self._settings.touchpoints_topic
        try:
            # A fresh request: the producer's cached metadata would look fine with the broker gone.
            cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), READY_TIMEOUT_S)
        except (KafkaError, OSError, TimeoutError) as error:
            self._trouble.set()
            return f"broker {self._settings.kafka_bootstrap_servers} did not return metadata: {error!r}"
        if not cluster.partitions_for_topic(topic):
            self._trouble.set()
            return f"topic {topic} does not exist on the broker"
        return None

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            # stop() flushes pending writes, which waits for their timeout while the broker is down.
            await asyncio.wait_for(producer.stop(), self._settings.producer_timeout_s + 1)
        except TimeoutError:
            log.warning("the producer did not stop in time; pending writes are dropped")


def _batches(
    producer: AIOKafkaProducer, partitions: list[int], records: list[EncodedRecord]
) -> list[tuple[int, BatchBuilder]]:
    """The records as record batches, one per partition (more if one fills up), in order.

    One batch and one delivery future per partition, instead of a future per record and the
    producer's per-send work (metadata check, partitioning, accumulator), is most of the cost of a
    large request's writes. Each record is where producer.send() would put it (same partitioner).
    """
    headers = [TOUCHPOINT_SCHEMA_HEADER]
    open_batches: dict[int, BatchBuilder] = {}
    batches: list[tuple[int, BatchBuilder]] = []
    for record in records:
        partition = partition_for(record.key, partitions)
        batch = open_batches.get(partition)
        if batch is None or batch.append(timestamp=None, key=record.key, value=record.value, headers=headers) is None:
            # New partition, or the batch is full (append closed it): a fresh batch takes any record.
            batch = open_batches[partition] = producer.create_batch()
            batches.append((partition, batch))
            batch.append(timestamp=None, key=record.key, value=record.value, headers=headers)
    for _, batch in batches:
        batch.close()  # nothing else may join them: their records are exactly this request's
    return batches


def _retrieve(delivery: asyncio.Future) -> None:
    if not delivery.cancelled():
        delivery.exception()
