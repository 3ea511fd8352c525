"""Journey maps: loading, validating and looking up journeys and their stages (SPEC 2)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from services.core.settings import SCHEMAS_DIR

JOURNEY_SCHEMA_PATH = SCHEMAS_DIR / "journey.schema.json"


class JourneyError(ValueError):
    """A journey map file is invalid."""


@dataclass(frozen=True)
class StageAlertRule:
    mean_gap_below: float = -2.0
    shortfall_rate_above: float = 0.5
    min_events: int = 20


@dataclass(frozen=True)
class Stage:
    id: str
    name: str
    promise: float = 7.0
    weight: float = 1.0
    touchpoints: tuple[str, ...] = ()
    phase: str | None = None
    description: str | None = None
    alert: StageAlertRule = field(default_factory=StageAlertRule)


@dataclass(frozen=True)
class Journey:
    id: str
    name: str
    revenue_threshold: float
    experience_threshold: float
    stages: tuple[Stage, ...]
    description: str | None = None
    currency: str | None = None

    def stage(self, stage_id: str) -> Stage | None:
        return self._stages_by_id.get(stage_id)

    @property
    def stage_ids(self) -> list[str]:
        return [stage.id for stage in self.stages]

    @cached_property
    def _stages_by_id(self) -> dict[str, Stage]:
        # cached_property writes the instance __dict__ directly, which a frozen dataclass allows.
        return {stage.id: stage for stage in self.stages}

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "currency": self.currency,
            "revenue_threshold": self.revenue_threshold,
            "experience_threshold": self.experience_threshold,
            "stages": [
                {
                    "id": stage.id,
                    "name": stage.name,
                    "description": stage.description,
                    "phase": stage.phase,
                    "promise": stage.promise,
                    "weight": stage.weight,
                    "touchpoints": list(stage.touchpoints),
                    "alert": {
                        "mean_gap_below": stage.alert.mean_gap_below,
                        "shortfall_rate_above": stage.alert.shortfall_rate_above,
                        "min_events": stage.alert.min_events,
                    },
                }
                for stage in self.stages
            ],
        }


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(json.loads(JOURNEY_SCHEMA_PATH.read_text()))


def parse_journey(document: dict, origin: str = "<document>") -> Journey:
    """Validate one journey document against journey.schema.json and build the Journey."""
    errors = sorted(_validator().iter_errors(document), key=lambda error: list(error.path))
    if errors:
        details = "; ".join(
            f"{'.'.join(str(part) for part in error.path) or '(root)'}: {error.message}" for error in errors
        )
        raise JourneyError(f"{origin}: {details}")
    stage_ids = [stage["id"] for stage in document["stages"]]
    duplicated = sorted({stage_id for stage_id in stage_ids if stage_ids.count(stage_id) > 1})
    if duplicated:
        raise JourneyError(f"{origin}: duplicated stage ids: {', '.join(duplicated)}")
    stages = tuple(
        Stage(
            id=stage["id"],
            name=stage["name"],
            promise=float(stage.get("promise", 7.0)),
            weight=float(stage.get("weight", 1.0)),
            touchpoints=tuple(stage.get("touchpoints", ())),
            phase=stage.get("phase"),
            description=stage.get("description"),
            alert=StageAlertRule(**stage.get("alert", {})),
        )
        for stage in document["stages"]
    )
    return Journey(
        id=document["id"],
        name=document["name"],
        revenue_threshold=float(document["revenue_threshold"]),
        experience_threshold=float(document.get("experience_threshold", 0.0)),
        stages=stages,
        description=document.get("description"),
        currency=document.get("currency"),
    )


def load_journeys(directory: Path) -> dict[str, Journey]:
    """Load every *.yaml / *.yml journey map of a directory, keyed by journey id."""
    if not directory.is_dir():
        raise JourneyError(f"journeys directory {directory} does not exist")
    journeys: dict[str, Journey] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        journey = parse_journey(yaml.safe_load(path.read_text()), origin=path.name)
        if journey.id in journeys:
            raise JourneyError(f"{path.name}: journey id '{journey.id}' is defined twice")
        journeys[journey.id] = journey
    if not journeys:
        raise JourneyError(f"no journey maps (*.yaml) in {directory}")
    return journeys


class JourneyCatalog:
    """The journeys of each tenant. For now every tenant has the shipped maps; per-tenant,
    versioned maps stored in Postgres are being added behind this same interface."""

    def __init__(self, shipped: dict[str, Journey]):
        self.shipped = shipped

    def of(self, tenant: str) -> dict[str, Journey]:
        """The tenant's journeys as last loaded (a sync read, safe inside a transaction)."""
        return self.shipped
