"""The event model accepts and rejects exactly what schemas/touchpoint-event.v1.schema.json does.

Only the structural rules are compared: every document names a known journey and stage and a
recent occurred_at. Rules the schema cannot express (a custom scale's range, min < max, real
calendar dates, the 2 KiB attributes limit, the clock, the tenant's journeys) are checked by
validate_event on top of the model and tested in test_event_validation.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from services.core.events import FIELDS, TouchpointEvent

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "touchpoint-event.v1.schema.json"
VALIDATOR = Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
OCCURRED_AT = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
RECENT_DAY = OCCURRED_AT[:10]
DELETE = object()


def event(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "event_id": "evt-0001",
        "occurred_at": OCCURRED_AT,
        "customer_id": "customer-42",
        "journey": "car-rental",
        "stage": "pickup",
        "experience": 6.5,
    }
    for name, value in overrides.items():
        if value is DELETE:
            document.pop(name, None)
        else:
            document[name] = value
    return document


def schema_accepts(document: Any) -> bool:
    return VALIDATOR.is_valid(document)


def model_accepts(document: Any) -> bool:
    try:
        TouchpointEvent.model_validate(document)
    except ValidationError:
        return False
    return True


FULL = {
    "touchpoint": "rental-counter",
    "channel": "in_person",
    "source": "survey",
    "expectation": 8,
    "emotion": "pleased",
    "revenue": 420.5,
    "attributes": {"agent": "A-17", "queue_minutes": 12, "member": True},
}

VALID = [
    ("minimal", event()),
    ("all optional fields", event(**FULL)),
    ("optional fields null", event(**{name: None for name in FULL}, scale=None)),
    ("integer experience at 0", event(experience=0)),
    ("integer experience at 10", event(experience=10)),
    ("expectation at the bounds", event(expectation=0.0, experience=10.0)),
    ("scale 1-5", event(scale={"min": 1, "max": 5}, experience=4, expectation=5)),
    ("negative scale", event(scale={"min": -5, "max": 5}, experience=-3)),
    ("large scale", event(scale={"min": 0, "max": 100}, experience=87.5)),
    ("scale at its bounds", event(scale={"min": -1_000_000, "max": 1_000_000}, experience=0)),
    ("event_id of every allowed character", event(event_id="Az09_.:-")),
    ("event_id of 64 characters", event(event_id="e" * 64)),
    ("customer_id of 128 characters", event(customer_id="c" * 128)),
    ("customer_id with spaces and Hangul", event(customer_id="고객 0042 / Seoul")),
    ("occurred_at with an offset", event(occurred_at=f"{RECENT_DAY}T10:15:00+09:00")),
    ("occurred_at lower-case t and z", event(occurred_at=f"{RECENT_DAY}t10:15:00z")),
    ("occurred_at with nanoseconds", event(occurred_at=f"{RECENT_DAY}T10:15:00.123456789Z")),
    ("occurred_at with a space", event(occurred_at=f"{RECENT_DAY} 10:15:00-05:30")),
    ("touchpoint of 64 characters", event(touchpoint="t" * 64)),
    ("channel call_centre", event(channel="call_centre")),
    ("source mystery_shopper", event(source="mystery_shopper")),
    ("emotion angry", event(emotion="angry")),
    ("revenue 0", event(revenue=0)),
    ("revenue at its maximum", event(revenue=1e15)),
    ("empty attributes", event(attributes={})),
    ("20 attributes", event(attributes={f"key{index}": index for index in range(20)})),
    ("attribute string of 1024 characters", event(attributes={"note": "x" * 1024})),
    ("attribute key of every allowed character", event(attributes={"Az09_.:-": False})),
]

INVALID = [
    *[(f"missing {name}", event(**{name: DELETE})) for name in ("event_id", "occurred_at", "customer_id")],
    *[(f"missing {name}", event(**{name: DELETE})) for name in ("journey", "stage", "experience")],
    ("unknown field (a typo)", event(experiance=7)),
    ("not an object: list", [event()]),
    ("not an object: string", "event"),
    ("not an object: null", None),
    ("event_id empty", event(event_id="")),
    ("event_id of 65 characters", event(event_id="e" * 65)),
    ("event_id with a space", event(event_id="evt 1")),
    # Python's re lets $ match before a final newline; the schema's patterns rule that out.
    ("event_id with a trailing newline", event(event_id="evt-1\n")),
    ("event_id a number", event(event_id=1)),
    ("occurred_at without offset", event(occurred_at=f"{RECENT_DAY}T10:15:00")),
    ("occurred_at a date only", event(occurred_at=RECENT_DAY)),
    ("occurred_at month 13", event(occurred_at="2026-13-01T10:15:00Z")),
    ("occurred_at hour 24", event(occurred_at=f"{RECENT_DAY}T24:00:00Z")),
    ("occurred_at epoch seconds", event(occurred_at=1_790_000_000)),
    ("occurred_at with a trailing newline", event(occurred_at=f"{OCCURRED_AT}\n")),
    ("customer_id empty", event(customer_id="")),
    ("customer_id of 129 characters", event(customer_id="c" * 129)),
    ("customer_id with a control character", event(customer_id="c\x07")),
    ("customer_id with a C1 control character", event(customer_id="c\x85d")),
    ("customer_id with a trailing newline", event(customer_id="customer-42\n")),
    ("journey upper-case", event(journey="Car-Rental")),
    ("journey null", event(journey=None)),
    ("stage starting with a hyphen", event(stage="-pickup")),
    ("touchpoint with an underscore", event(touchpoint="rental_counter")),
    ("touchpoint of 65 characters", event(touchpoint="t" * 65)),
    ("channel not in the list", event(channel="phone")),
    ("source in the wrong case", event(source="Survey")),
    ("emotion not in the list", event(emotion="happy")),
    ("experience a string", event(experience="7")),
    ("experience a boolean", event(experience=True)),
    ("experience null", event(experience=None)),
    ("experience above 10 without scale", event(experience=10.5)),
    ("experience below 0 without scale", event(experience=-0.1)),
    ("expectation above 10 with scale null", event(expectation=11, scale=None)),
    ("expectation a string", event(expectation="high")),
    ("scale without max", event(scale={"min": 1})),
    ("scale with an extra key", event(scale={"min": 1, "max": 5, "step": 1})),
    ("scale min a string", event(scale={"min": "1", "max": 5})),
    ("scale max beyond 1e6", event(scale={"min": 0, "max": 2e6})),
    ("scale a list", event(scale=[1, 5])),
    ("revenue negative", event(revenue=-1)),
    ("revenue beyond 1e15", event(revenue=1e16)),
    ("revenue a string", event(revenue="420")),
    ("21 attributes", event(attributes={f"key{index}": index for index in range(21)})),
    ("attribute value an object", event(attributes={"nested": {"a": 1}})),
    ("attribute value a list", event(attributes={"tags": ["a"]})),
    ("attribute value null", event(attributes={"agent": None})),
    ("attribute key with a space", event(attributes={"queue minutes": 12})),
    ("attribute key with a trailing newline", event(attributes={"agent\n": "A-17"})),
    ("attribute string of 1025 characters", event(attributes={"note": "x" * 1025})),
    ("attributes a list", event(attributes=[["agent", "A-17"]])),
]

CASES = [pytest.param(document, True, id=name) for name, document in VALID] + [
    pytest.param(document, False, id=name) for name, document in INVALID
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("document", "valid"), CASES)
def test_schema_and_model_agree_on_the_table(document: Any, valid: bool) -> None:
    assert schema_accepts(document) is valid
    assert model_accepts(document) is valid


# Generated documents: a valid event with a few fields deleted, set to random JSON, set to
# near misses of a valid value (boundaries, wrong case, a trailing newline), or unknown fields added.

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)  # orjson's integer range
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN or infinity
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=20)  # no lone surrogates in JSON
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
NEAR_MISS_NUMBERS = st.sampled_from([0, 0.0, -0.0, 10, 10.0, 10.000001, -1e-9, 5, 1e6, 1e6 + 1, -1e6, 1e15, 1e16])
SCALES = st.dictionaries(st.sampled_from(["min", "max", "step"]), NEAR_MISS_NUMBERS | JSON_SCALARS, max_size=3)
ATTRIBUTES = st.dictionaries(
    st.sampled_from(["agent", "queue_minutes", "a b", "x" * 64, "x" * 65, "k\n", "é"]) | st.text(max_size=6),
    JSON_VALUES | st.text(alphabet="ab", min_size=1020, max_size=1030),
    max_size=22,
)
VALID_VALUES = {**event(), **FULL, "scale": {"min": 1, "max": 5}}


def near_misses(value: str) -> list[str]:
    return [
        value, f"{value}\n", f"{value}\r", f"{value} ", f"-{value}", value.upper(), value[:-1], value * 5,
        f"{value}\x00", f"{value}\x85", value.replace("-", "_"), value.replace(":", "-", 1),
    ]  # fmt: skip


def field_values(name: str) -> st.SearchStrategy[Any]:
    valid = VALID_VALUES.get(name, "value")
    choices = [st.sampled_from(near_misses(valid))] if isinstance(valid, str) else []
    choices += [{"scale": SCALES, "attributes": ATTRIBUTES}.get(name, st.just(valid)), NEAR_MISS_NUMBERS, JSON_VALUES]
    return st.one_of(choices)


@st.composite
def mutated_events(draw: st.DrawFn) -> dict[str, Any]:
    document = event(**draw(st.sampled_from([{}, FULL, {"scale": {"min": 1, "max": 5}, "experience": 3}])))
    names = draw(st.lists(st.sampled_from([*FIELDS, "experiance", "tenant"]), min_size=1, max_size=2, unique=True))
    for name in names:
        if draw(st.integers(0, 4)) == 0:
            document.pop(name, None)
        else:
            document[name] = draw(field_values(name))
    # What the service validates went through JSON.
    return orjson.loads(orjson.dumps(document))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_events())
def test_schema_and_model_agree_on_mutated_events(document: dict[str, Any]) -> None:
    assert model_accepts(document) is schema_accepts(document), sorted(VALIDATOR.iter_errors(document), key=str)
