"""Ingest's fast paths give exactly what the straightforward ones gave: a batch validated in one
pydantic call (errors per event), the record JSON written without a second model, occurred_at
parsed without the regex, the partition computed once per key, the records grouped in batches."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
import orjson
from hypothesis import HealthCheck, given, settings, strategies as st

from services.core.events import (
    ALLOWED, DEFAULT_SCALE, MAX_ATTRIBUTES_BYTES, RFC3339_PATTERN, EncodedRecord, EventInvalid, FieldError,
    TouchpointEvent, TouchpointRecord, ValidationContext, _json_datetime, _json_occurred_at, _parse_event, encode_event,
    encode_events, parse_occurred_at, validate_event,
)  # fmt: skip
from services.core.journeys import load_journeys
from services.core.kafka import TOUCHPOINT_SCHEMA_HEADER, touchpoint_key
from services.core.settings import DEFAULT_JOURNEYS_DIR
from services.ingest.producer import _batches, partition_for
from tests.unit.test_event_contract import FULL, event, mutated_events

JOURNEYS = load_journeys(DEFAULT_JOURNEYS_DIR)
NOW = datetime.now(timezone.utc)
CONTEXT = ValidationContext(
    tenant="acme", journeys=JOURNEYS, now=NOW, max_event_age_s=30 * 86400, max_future_skew_s=300
)


def reference(payload: Any) -> EncodedRecord | list:
    """What ingest wrote before: the rules as they were first written, the record model and its
    to_json (model_dump + orjson); an independent oracle for validate_event and the fast paths."""
    try:
        record = TouchpointRecord(**old_record_fields(_parse_event(payload), CONTEXT))
    except EventInvalid as invalid:
        return invalid.errors
    return EncodedRecord(record.event_id, touchpoint_key(record.tenant, record.customer_id), record.to_json())


def old_record_fields(event: TouchpointEvent, context: ValidationContext) -> dict[str, Any]:
    """The rules of services.core.events before its fast path (the common case in fewer steps)."""
    errors: list[FieldError] = []
    try:
        occurred_at = parse_occurred_at(event.occurred_at)
    except ValueError:
        occurred_at = None
        errors.append(FieldError("occurred_at", "is not a real date and time", ALLOWED["occurred_at"]))
    age_s = 0.0 if occurred_at is None else (context.now - occurred_at).total_seconds()
    if age_s < -context.max_future_skew_s:
        errors.append(FieldError("occurred_at", f"is {-age_s:.0f} s in the future", ALLOWED["occurred_at"]))
    elif age_s > context.max_event_age_s:
        message = (
            f"is {age_s / 86400:.1f} days old, older than max_event_age ({context.max_event_age_s / 86400:g} days)"
        )
        errors.append(FieldError("occurred_at", message, ALLOWED["occurred_at"]))
    journey = context.journeys.get(event.journey)
    stage = None
    if journey is None:
        known = sorted(context.journeys)
        errors.append(FieldError(
            "journey", f"unknown journey '{event.journey}'; known journeys: {', '.join(known)}", known
        ))  # fmt: skip
    else:
        stage = journey.stage(event.stage)
        if stage is None:
            known = journey.stage_ids
            message = f"unknown stage '{event.stage}' in journey '{journey.id}'; known stages: {', '.join(known)}"
            errors.append(FieldError("stage", message, known))
    scale = event.scale or DEFAULT_SCALE
    if event.scale is not None and not scale.min < scale.max:
        message = f"min ({scale.min:g}) must be less than max ({scale.max:g})"
        errors.append(FieldError("scale", message, ALLOWED["scale"]))
    else:
        for name in ("experience", "expectation"):
            value = getattr(event, name)
            if value is not None and not scale.min <= value <= scale.max:
                message = f"{value:g} is outside the scale {scale.min:g}-{scale.max:g}"
                errors.append(FieldError(name, message, ALLOWED[name]))
    if event.attributes is not None:
        size = len(orjson.dumps(event.attributes))
        if size > MAX_ATTRIBUTES_BYTES:
            errors.append(FieldError("attributes", f"is {size} bytes as JSON", ALLOWED["attributes"]))
    if errors or stage is None or occurred_at is None:
        raise EventInvalid(errors)

    def normalised(value: float) -> float:
        value = (value - scale.min) / (scale.max - scale.min) * 10.0
        return min(10.0, max(0.0, value)) if math.isfinite(value) else value

    return dict(
        tenant=context.tenant, event_id=event.event_id, occurred_at=occurred_at, received_at=context.now,
        customer_id=event.customer_id, journey=event.journey, stage=event.stage, touchpoint=event.touchpoint,
        channel=event.channel, source=event.source, experience=normalised(event.experience),
        expectation=min(10.0, max(0.0, stage.promise)) if event.expectation is None else normalised(event.expectation),
        promise=stage.promise, weight=stage.weight, emotion=event.emotion, revenue=event.revenue,
        attributes=event.attributes,
    )  # fmt: skip


def outcome(result: EncodedRecord | EventInvalid) -> EncodedRecord | list:
    return result.errors if isinstance(result, EventInvalid) else result


@st.composite
def occurred_at_texts(draw: st.DrawFn) -> str:
    """RFC 3339 timestamps of the last days, in every spelling the schema allows."""
    offset = timedelta(minutes=draw(st.integers(-(24 * 60 - 1), 24 * 60 - 1)))
    moment = (NOW - timedelta(seconds=draw(st.floats(0, 20 * 86400)))).astimezone(timezone(offset))
    text = moment.strftime("%Y-%m-%d") + draw(st.sampled_from("Tt ")) + moment.strftime("%H:%M:%S")
    digits = draw(st.integers(0, 9))
    if digits:
        text += "." + draw(st.text("0123456789", min_size=digits, max_size=digits))
    zone = moment.strftime("%z")
    if offset == timedelta(0) and draw(st.booleans()):
        return text + draw(st.sampled_from(["Z", "z", "-00:00"]))
    return f"{text}{zone[:3]}:{zone[3:]}"


@st.composite
def posted_events(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(mutated_events())  # mostly invalid, in every field
    document = event(**draw(st.sampled_from([{}, FULL, {"scale": {"min": 1, "max": 5}, "experience": 3}])))
    document["occurred_at"] = draw(occurred_at_texts())
    printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    document["customer_id"] = draw(st.text(printable, min_size=1, max_size=5))
    if kind == 2:
        document["experience"] = draw(st.floats(0, 10) | st.integers(0, 10))
        document["revenue"] = draw(st.floats(0, 1e15) | st.integers(0, 10**9))
        document["attributes"] = draw(st.dictionaries(
            st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.booleans() | st.floats(-1e9, 1e9) | st.text(max_size=5),
            max_size=4,
        ))  # fmt: skip
    if kind == 3:
        return draw(st.sampled_from([None, [], "event", 3]))
    if draw(st.booleans()):  # the rules the model cannot state, each near its edge
        choice = draw(st.integers(0, 4))
        if choice == 0:
            low = draw(st.floats(-100, 100))
            document["scale"] = {"min": low, "max": low + draw(st.floats(-1, 100))}
            document["experience"] = draw(st.floats(-200, 200))
            document["expectation"] = draw(st.none() | st.floats(-200, 200))
        elif choice == 1:
            document["occurred_at"] = (NOW + timedelta(seconds=draw(st.floats(-31 * 86400, 400)))).isoformat()
        elif choice == 2:
            document["attributes"] = {f"k{index}": "x" * draw(st.integers(0, 200)) for index in range(12)}
        elif choice == 3:
            document["stage"] = draw(st.sampled_from(["pickup", "no-such-stage"]))
        else:
            document["experience"] = draw(st.sampled_from([0, 0.0, -0.0, 10, 10.0, 1e-300]))
    return document


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(posted_events())
def test_one_event_is_encoded_as_the_model_wrote_it(payload: Any) -> None:
    try:
        encoded: EncodedRecord | list = encode_event(payload, CONTEXT)
    except EventInvalid as invalid:
        encoded = invalid.errors
    assert encoded == reference(payload)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(posted_events(), min_size=1, max_size=8))
def test_a_batch_gives_each_event_what_it_gives_alone(payloads: list[Any]) -> None:
    assert [outcome(result) for result in encode_events(payloads, CONTEXT)] == [reference(p) for p in payloads]


def test_a_record_written_fast_reads_back_as_the_same_record() -> None:
    payload = event(**FULL, occurred_at=(NOW - timedelta(hours=2)).astimezone(timezone(timedelta(hours=9))).isoformat())
    encoded = encode_event(payload, CONTEXT)
    assert TouchpointRecord.model_validate_json(encoded.value) == validate_event(payload, CONTEXT)
    assert encoded.key == b"acme:customer-42"


@settings(max_examples=1000, deadline=None)
@given(st.from_regex(RFC3339_PATTERN, fullmatch=True) | occurred_at_texts())
def test_occurred_at_is_written_as_the_model_writes_its_datetime(value: str) -> None:
    try:
        moment = parse_occurred_at(value)
    except ValueError:
        return
    assert _json_occurred_at(value, moment) == _json_datetime(moment)


def test_occurred_at_texts_written_as_they_are_or_rewritten() -> None:
    cases = {
        "2026-11-24T03:13:29.123456Z": "2026-11-24T03:13:29.123456Z",
        "2026-11-24T03:13:29.1234Z": "2026-11-24T03:13:29.123400Z",  # as long as an offset
        "2026-11-24T03:13:29.000000Z": "2026-11-24T03:13:29Z",
        "2026-11-24T03:13:29-00:00": "2026-11-24T03:13:29Z",
        "2026-11-24T03:13:29.5+09:00": "2026-11-24T03:13:29.500000+09:00",  # as long as 6 digits and Z
        "2026-11-24T03:13:29.123456+05:30": "2026-11-24T03:13:29.123456+05:30",
        "2026-11-24t03:13:29z": "2026-11-24T03:13:29Z",
    }
    assert {text: _json_occurred_at(text, parse_occurred_at(text)) for text in cases} == cases


def old_parse_occurred_at(value: str) -> datetime:
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("t", "T").replace("z", "Z").replace(" ", "T", 1))
    return datetime.fromisoformat(text)


def parsed(parse, value: str) -> datetime | str:
    try:
        moment = parse(value)
    except ValueError:
        return "invalid"
    return f"{moment.isoformat()} {moment.utcoffset()}"  # the same instant and the same offset


@settings(max_examples=500, deadline=None)
@given(st.from_regex(RFC3339_PATTERN, fullmatch=True) | occurred_at_texts())
def test_occurred_at_parses_as_the_regex_normalisation_did(value: str) -> None:
    assert parsed(parse_occurred_at, value) == parsed(old_parse_occurred_at, value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(1, 64))
def test_the_partition_is_the_default_partitioners(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_for(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


class FakeProducer:
    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0)


def batch_records(batch: BatchBuilder) -> list[tuple[bytes, bytes, list]]:
    from aiokafka.record.default_records import DefaultRecordBatch

    records = DefaultRecordBatch(bytearray(batch._build()))
    return [(record.key, record.value, list(record.headers)) for record in records]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a:1", b"a:2", b"b:7", b"c:x"]), st.binary(max_size=300)), max_size=40),
       st.sampled_from([1024, 256 * 1024]))  # fmt: skip
def test_records_go_in_order_to_their_partitions_batches(pairs: list[tuple[bytes, bytes]], batch_size: int) -> None:
    records = [EncodedRecord(f"e{index}", key, value) for index, (key, value) in enumerate(pairs)]
    partitions = list(range(5))
    batches = _batches(FakeProducer(batch_size), partitions, records)  # type: ignore[arg-type]
    header = [(TOUCHPOINT_SCHEMA_HEADER[0], TOUCHPOINT_SCHEMA_HEADER[1])]
    for partition in partitions:
        written = [entry for number, batch in batches if number == partition for entry in batch_records(batch)]
        expected = [(r.key, r.value, header) for r in records if partition_for(r.key, partitions) == partition]
        assert written == expected
    assert all(batch.append(timestamp=None, key=b"k", value=b"v") is None for _, batch in batches)  # closed
