"""validate_event: field-level errors, the rules that need the journeys or the clock, and the
normalisation of scores into the record written to Kafka."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from services.core.events import (
    ALLOWED, FIELDS, EventInvalid, FieldError, TouchpointRecord, ValidationContext, validate_event,
)  # fmt: skip
from services.core.journeys import load_journeys
from services.core.settings import DEFAULT_JOURNEYS_DIR

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "touchpoint-event.v1.schema.json"
SCHEMA = Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
JOURNEYS = load_journeys(DEFAULT_JOURNEYS_DIR)
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
CONTEXT = ValidationContext(
    tenant="acme", journeys=JOURNEYS, now=NOW, max_event_age_s=30 * 86400, max_future_skew_s=300
)
PICKUP_PROMISE = JOURNEYS["car-rental"].stage("pickup").promise


def at(delta: timedelta) -> str:
    return (NOW + delta).isoformat()


def event(**overrides: Any) -> dict[str, Any]:
    document = {
        "event_id": "evt-0001",
        "occurred_at": at(-timedelta(hours=1)),
        "customer_id": "customer-42",
        "journey": "car-rental",
        "stage": "pickup",
        "experience": 6.5,
    }
    document.update(overrides)
    return document


def errors_of(document: Any) -> list[FieldError]:
    with pytest.raises(EventInvalid) as raised:
        validate_event(document, CONTEXT)
    return raised.value.errors


def only_error(document: Any) -> FieldError:
    errors = errors_of(document)
    assert len(errors) == 1, errors
    return errors[0]


def test_a_valid_event_becomes_the_record_with_tenant_promise_and_weight() -> None:
    record = validate_event(event(touchpoint="kiosk", channel="kiosk", revenue=99.5), CONTEXT)

    assert isinstance(record, TouchpointRecord)
    stage = JOURNEYS["car-rental"].stage("pickup")
    assert (record.tenant, record.event_id, record.customer_id) == ("acme", "evt-0001", "customer-42")
    assert (record.promise, record.weight) == (stage.promise, stage.weight)
    assert record.experience == 6.5
    assert record.received_at == NOW
    assert record.occurred_at == NOW - timedelta(hours=1)
    assert record.gap == pytest.approx(6.5 - stage.promise)


def test_expectation_defaults_to_the_stage_promise() -> None:
    record = validate_event(event(), CONTEXT)
    assert record.expectation == PICKUP_PROMISE == record.promise


def test_a_given_expectation_is_kept() -> None:
    assert validate_event(event(expectation=9), CONTEXT).expectation == 9.0


@pytest.mark.parametrize(
    ("scale", "experience", "expectation", "normalised_experience", "normalised_expectation"),
    [
        ({"min": 1, "max": 5}, 4, 5, 7.5, 10.0),
        ({"min": 1, "max": 5}, 1, 3, 0.0, 5.0),
        ({"min": 0, "max": 100}, 85, 70, 8.5, 7.0),
        ({"min": -3, "max": 3}, 0, -3, 5.0, 0.0),
    ],
)
def test_scores_on_a_custom_scale_are_normalised_to_0_10(
    scale: dict, experience: float, expectation: float, normalised_experience: float, normalised_expectation: float
) -> None:
    record = validate_event(event(scale=scale, experience=experience, expectation=expectation), CONTEXT)
    assert record.experience == pytest.approx(normalised_experience)
    assert record.expectation == pytest.approx(normalised_expectation)


def test_on_a_custom_scale_the_default_expectation_is_still_the_promise_on_0_10() -> None:
    record = validate_event(event(scale={"min": 1, "max": 5}, experience=5), CONTEXT)
    assert (record.experience, record.expectation) == (10.0, PICKUP_PROMISE)


def test_an_offset_timestamp_is_read_as_the_same_instant() -> None:
    local = (NOW - timedelta(hours=2)).astimezone(timezone(timedelta(hours=9)))
    record = validate_event(event(occurred_at=local.isoformat()), CONTEXT)
    assert record.occurred_at == NOW - timedelta(hours=2)


def test_unknown_stage_lists_the_known_stages() -> None:
    error = only_error(event(stage="pikcup"))

    stage_ids = JOURNEYS["car-rental"].stage_ids
    assert error.field == "stage"
    assert "unknown stage 'pikcup' in journey 'car-rental'" in error.message
    assert f"known stages: {', '.join(stage_ids)}" in error.message
    assert error.allowed == stage_ids


def test_unknown_journey_lists_the_journeys() -> None:
    error = only_error(event(journey="car-rentals"))

    assert error.field == "journey"
    assert "unknown journey 'car-rentals'" in error.message
    assert error.allowed == sorted(JOURNEYS)
    for journey in ("airline", "car-rental", "hotel", "telecom"):
        assert journey in error.message


def test_an_unknown_field_is_named_not_dropped() -> None:
    error = only_error(event(experiance=7))

    assert error.field == "experiance"
    assert error.message == "unknown field 'experiance'"
    assert error.allowed == list(FIELDS)


def test_a_missing_field_is_named() -> None:
    document = event()
    del document["customer_id"]
    error = only_error(document)
    assert (error.field, error.message, error.allowed) == ("customer_id", "field required", ALLOWED["customer_id"])


def test_an_event_that_is_not_an_object_is_rejected_as_a_whole() -> None:
    error = only_error(["not", "an", "event"])
    assert error.field == "(event)"
    assert "JSON object" in error.message


def test_every_problem_is_reported_at_once() -> None:
    errors = errors_of(event(event_id="", channel="phone", experience="7", extra=1))
    assert {error.field for error in errors} == {"event_id", "channel", "experience", "extra"}


def test_an_event_a_little_in_the_future_is_accepted_as_clock_skew() -> None:
    assert validate_event(event(occurred_at=at(timedelta(minutes=4))), CONTEXT)


def test_an_event_more_than_5_minutes_in_the_future_is_rejected() -> None:
    error = only_error(event(occurred_at=at(timedelta(minutes=10))))
    assert error.field == "occurred_at"
    assert "600 s in the future" in error.message
    assert error.allowed == ALLOWED["occurred_at"]


def test_an_event_within_max_event_age_is_accepted() -> None:
    assert validate_event(event(occurred_at=at(-timedelta(days=29))), CONTEXT)


def test_an_event_older_than_max_event_age_is_rejected() -> None:
    error = only_error(event(occurred_at=at(-timedelta(days=31))))
    assert error.field == "occurred_at"
    assert "31.0 days old" in error.message and "max_event_age (30 days)" in error.message


# Rules the JSON Schema cannot express: the schema accepts these events (asserted, so the
# difference stays deliberate), the service rejects them. They are kept out of the equivalence
# table in test_event_contract.py.


def test_a_score_outside_a_custom_scale_is_rejected() -> None:
    # The schema cannot compare a score with the event's own scale.min and scale.max.
    document = event(scale={"min": 1, "max": 5}, experience=6, expectation=0)
    assert SCHEMA.is_valid(document)

    errors = errors_of(document)
    assert [(error.field, error.message) for error in errors] == [
        ("experience", "6 is outside the scale 1-5"),
        ("expectation", "0 is outside the scale 1-5"),
    ]
    assert all(error.allowed for error in errors)


@pytest.mark.parametrize("scale", [{"min": 5, "max": 1}, {"min": 3, "max": 3}])
def test_a_scale_needs_min_below_max(scale: dict) -> None:
    # The schema cannot compare two values of the document.
    document = event(scale=scale, experience=3)
    assert SCHEMA.is_valid(document)

    error = only_error(document)
    assert error.field == "scale"
    assert "must be less than max" in error.message
    assert error.allowed == ALLOWED["scale"]


@pytest.mark.parametrize("occurred_at", ["2026-02-30T10:00:00Z", "2025-02-29T10:00:00Z", "2026-04-31T10:00:00Z"])
def test_a_date_that_does_not_exist_is_rejected(occurred_at: str) -> None:
    # The schema's pattern knows days 01-31, not the length of each month.
    document = event(occurred_at=occurred_at)
    assert SCHEMA.is_valid(document)

    errors = errors_of(document)
    assert errors[0].field == "occurred_at"
    assert errors[0].message == "is not a real date and time"


def test_attributes_larger_than_2_kib_are_rejected() -> None:
    # The schema bounds keys and values one by one, not the size of the whole map.
    document = event(attributes={f"note{index}": "x" * 200 for index in range(12)})
    assert SCHEMA.is_valid(document)

    error = only_error(document)
    assert error.field == "attributes"
    assert "bytes as JSON" in error.message
    assert "2048 bytes" in error.allowed


INVALID_EVENTS = [
    event(event_id="has space"),
    event(occurred_at="yesterday"),
    event(occurred_at=at(timedelta(days=1))),
    event(customer_id="\x00"),
    event(journey="hotel", stage="pickup"),
    event(journey="Car Rental"),
    event(touchpoint="Front Desk"),
    event(channel="fax"),
    event(source="poll"),
    event(experience=11),
    event(expectation=-1),
    event(scale={"min": 1}),
    event(scale={"min": 1, "max": 5, "step": 1}),
    event(emotion="sad"),
    event(revenue=-5),
    event(attributes={"k": {"nested": True}}),
    event(attributes={"bad key": 1}),
    event(attributes={f"k{index}": index for index in range(21)}),
    event(unexpected=True),
]


@pytest.mark.parametrize("document", INVALID_EVENTS)
def test_every_error_names_its_field_says_what_is_wrong_and_what_is_allowed(document: dict) -> None:
    for error in errors_of(document):
        top_field = error.field.split(".")[0]
        assert top_field in document, error
        assert error.message.strip(), error
        # Every rejection of a known or unknown field says what is allowed there.
        assert error.allowed, error
        assert error.to_dict()["allowed"] == error.allowed
        assert set(error.to_dict()) == {"field", "message", "allowed"}
