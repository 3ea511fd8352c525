"""The shipped journey maps (schemas/journeys/*.yaml) and the journey JSON Schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA_PATH = SCHEMAS_DIR / "journey.schema.json"
JOURNEYS_DIR = SCHEMAS_DIR / "journeys"
JOURNEY_FILES = sorted([*JOURNEYS_DIR.glob("*.yaml"), *JOURNEYS_DIR.glob("*.yml")])

REQUIRED_JOURNEYS = {"car-rental", "telecom", "hotel", "airline"}


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def load_journey(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def validator() -> Draft202012Validator:
    return Draft202012Validator(load_schema())


def minimal_journey() -> dict[str, Any]:
    return {
        "id": "demo",
        "name": "Demo",
        "revenue_threshold": 100.0,
        "stages": [
            {
                "id": "reservation",
                "name": "Reservation",
                "promise": 8.0,
                "weight": 1.0,
                "touchpoints": ["web", "call-centre"],
                "alert": {"mean_gap_below": -2.0, "shortfall_rate_above": 0.5, "min_events": 20},
            }
        ],
    }


# --- the schema itself -------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12() -> None:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://cem.example/schemas/journey.schema.json"


def test_minimal_journey_is_valid() -> None:
    assert list(validator().iter_errors(minimal_journey())) == []


def test_stage_without_optional_fields_is_valid() -> None:
    doc = minimal_journey()
    doc["stages"] = [{"id": "pickup", "name": "Pickup"}]
    assert list(validator().iter_errors(doc)) == []


# --- shipped journeys --------------------------------------------------------------------


def test_required_journeys_exist() -> None:
    ids = {load_journey(path)["id"] for path in JOURNEY_FILES}
    assert REQUIRED_JOURNEYS <= ids, f"missing journeys: {sorted(REQUIRED_JOURNEYS - ids)}"


@pytest.mark.parametrize("path", JOURNEY_FILES, ids=lambda p: p.name)
def test_journey_file_validates(path: Path) -> None:
    errors = sorted(validator().iter_errors(load_journey(path)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", JOURNEY_FILES, ids=lambda p: p.name)
def test_journey_id_matches_file_name(path: Path) -> None:
    assert load_journey(path)["id"] == path.stem


@pytest.mark.parametrize("path", JOURNEY_FILES, ids=lambda p: p.name)
def test_stage_ids_unique(path: Path) -> None:
    stage_ids = [stage["id"] for stage in load_journey(path)["stages"]]
    duplicates = sorted({s for s in stage_ids if stage_ids.count(s) > 1})
    assert not duplicates, f"duplicate stage ids in {path.name}: {duplicates}"


@pytest.mark.parametrize("path", JOURNEY_FILES, ids=lambda p: p.name)
def test_stages_have_touchpoints_and_alert(path: Path) -> None:
    for stage in load_journey(path)["stages"]:
        assert len(stage.get("touchpoints", [])) >= 2, stage["id"]
        assert "alert" in stage, stage["id"]
        assert stage.get("description"), stage["id"]


def test_telecom_stages_are_grouped_by_lifecycle_phase() -> None:
    journey = load_journey(JOURNEYS_DIR / "telecom.yaml")
    phases = [stage.get("phase") for stage in journey["stages"]]
    assert None not in phases
    # Phases appear in lifecycle order, each as one contiguous block.
    order = list(dict.fromkeys(phases))
    assert order == ["awareness", "subscription", "use", "termination", "after-termination"]
    for stage in journey["stages"]:
        assert stage["id"].startswith(stage["phase"] + "-"), stage["id"]


# --- invalid documents are rejected ------------------------------------------------------


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _drop(doc: dict[str, Any], key: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    del doc[key]
    return doc


INVALID = {
    "unknown top-level field": _set(minimal_journey(), ("revenue_treshold",), 5.0),
    "unknown stage field": _set(minimal_journey(), ("stages", 0, "promise_level"), 8.0),
    "unknown alert field": _set(minimal_journey(), ("stages", 0, "alert", "min_event"), 5),
    "journey id upper case": _set(minimal_journey(), ("id",), "Car-Rental"),
    "journey id leading hyphen": _set(minimal_journey(), ("id",), "-car"),
    "journey id too long": _set(minimal_journey(), ("id",), "a" * 65),
    "stage id with underscore": _set(minimal_journey(), ("stages", 0, "id"), "vehicle_handover"),
    "bad phase slug": _set(minimal_journey(), ("stages", 0, "phase"), "Use"),
    "bad touchpoint slug": _set(minimal_journey(), ("stages", 0, "touchpoints"), ["web", "Call Centre"]),
    "duplicate touchpoint": _set(minimal_journey(), ("stages", 0, "touchpoints"), ["web", "web"]),
    "promise 11": _set(minimal_journey(), ("stages", 0, "promise"), 11),
    "promise negative": _set(minimal_journey(), ("stages", 0, "promise"), -0.5),
    "weight 0": _set(minimal_journey(), ("stages", 0, "weight"), 0),
    "weight above 100": _set(minimal_journey(), ("stages", 0, "weight"), 101),
    "empty stages": _set(minimal_journey(), ("stages",), []),
    "missing stages": _drop(minimal_journey(), "stages"),
    "missing revenue_threshold": _drop(minimal_journey(), "revenue_threshold"),
    "negative revenue_threshold": _set(minimal_journey(), ("revenue_threshold",), -1),
    "experience_threshold above 10": _set(minimal_journey(), ("experience_threshold",), 10.5),
    "lower-case currency": _set(minimal_journey(), ("currency",), "usd"),
    "empty name": _set(minimal_journey(), ("name",), ""),
    "stage without name": _set(minimal_journey(), ("stages", 0), {"id": "reservation"}),
    "mean_gap_below positive": _set(minimal_journey(), ("stages", 0, "alert", "mean_gap_below"), 1.0),
    "shortfall_rate_above 1.5": _set(minimal_journey(), ("stages", 0, "alert", "shortfall_rate_above"), 1.5),
    "min_events 0": _set(minimal_journey(), ("stages", 0, "alert", "min_events"), 0),
    "min_events not integer": _set(minimal_journey(), ("stages", 0, "alert", "min_events"), 2.5),
}


@pytest.mark.parametrize("doc", INVALID.values(), ids=INVALID.keys())
def test_invalid_journey_rejected(doc: dict[str, Any]) -> None:
    assert not validator().is_valid(doc)


def test_too_many_stages_rejected() -> None:
    doc = minimal_journey()
    doc["stages"] = [{"id": f"s{i}", "name": f"Stage {i}"} for i in range(201)]
    assert not validator().is_valid(doc)
    doc["stages"] = doc["stages"][:200]
    assert validator().is_valid(doc)
