"""The batch polled while another is scored: what `without_committed` drops before it is scored."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from services.scoring.consumer import without_committed

TP0 = TopicPartition("touchpoints", 0)
TP1 = TopicPartition("touchpoints", 1)


def record(tp: TopicPartition, offset: int, value: bytes | None = None) -> ConsumerRecord:
    value = f"{tp.partition}-{offset}".encode() if value is None else value
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, None, value, None, 0, len(value), [])


def offsets(batch) -> dict[int, list[int]]:
    return {tp.partition: [item.offset for item in records] for tp, records in batch.items()}


def test_records_of_the_committed_batch_delivered_again_are_dropped_and_the_rest_kept():
    scored = {TP0: [record(TP0, n) for n in range(0, 5)], TP1: [record(TP1, n) for n in range(0, 3)]}
    # Fetched twice: once before the assignment's seek, once after it, then further on.
    polled = {TP0: [record(TP0, n) for n in range(2, 8)], TP1: [record(TP1, n) for n in range(0, 3)]}
    kept = without_committed(polled, scored, {TP0: 5, TP1: 3})
    assert offsets(kept) == {0: [5, 6, 7]}


def test_records_not_committed_are_kept():
    scored = {TP0: [record(TP0, n) for n in range(0, 5)]}
    polled = {TP0: [record(TP0, n) for n in range(0, 5)]}
    # Its batch was dropped (stale offsets, a stop) or its partition revoked: nothing committed.
    assert offsets(without_committed(polled, scored, {TP0: None})) == {0: [0, 1, 2, 3, 4]}
    assert offsets(without_committed(polled, scored, {})) == {0: [0, 1, 2, 3, 4]}
    # Another consumer's commit fenced this one at offset 2: offsets 2-4 are still to be scored.
    assert offsets(without_committed(polled, scored, {TP0: 2})) == {0: [2, 3, 4]}


def test_other_records_at_committed_offsets_are_kept():
    # The memory-only broker restarted and the topic was recreated: offsets start again at 0.
    scored = {TP0: [record(TP0, n) for n in range(0, 5)]}
    polled = {TP0: [record(TP0, n, value=b"new %d" % n) for n in range(0, 3)]}
    assert offsets(without_committed(polled, scored, {TP0: 5})) == {0: [0, 1, 2]}


def test_records_below_the_stored_offset_that_the_batch_did_not_hold_are_kept():
    # Read again after a seek back (the `_ranges` path): not this batch's, so not dropped here.
    scored = {TP0: [record(TP0, n) for n in range(10, 15)]}
    polled = {TP0: [record(TP0, n) for n in range(0, 12)]}
    assert offsets(without_committed(polled, scored, {TP0: 15})) == {0: list(range(0, 10))}


def test_nothing_scored_before_keeps_the_whole_poll():
    polled = {TP0: [record(TP0, n) for n in range(0, 3)]}
    assert without_committed(polled, {}, {TP0: 7}) == polled
