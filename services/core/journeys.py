"""Journey maps: loading, validating and looking up journeys and their stages (SPEC 2)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, cached_property
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from services.core.settings import SCHEMAS_DIR

JOURNEY_SCHEMA_PATH = SCHEMAS_DIR / "journey.schema.json"


class JourneyError(ValueError):
    """A journey map is invalid. `problems` holds (field path, message) pairs, e.g.
    ("stages.2.promise", "11 is greater than the maximum of 10")."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or [("(root)", message)]


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
    errors = sorted(_validator().iter_errors(document), key=lambda error: [str(part) for part in error.path])
    if errors:
        problems = [(".".join(str(part) for part in error.path) or "(root)", error.message) for error in errors]
        raise JourneyError(f"{origin}: " + "; ".join(f"{path}: {message}" for path, message in problems), problems)
    stage_ids = [stage["id"] for stage in document["stages"]]
    duplicated = sorted({stage_id for stage_id in stage_ids if stage_ids.count(stage_id) > 1})
    if duplicated:
        message = f"duplicated stage ids: {', '.join(duplicated)}; stage ids must be unique within a journey"
        raise JourneyError(f"{origin}: {message}", [("stages", message)])
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


@dataclass(frozen=True)
class JourneyVersion:
    """One stored version of a tenant's journey; `journey` is None when that version retired it."""

    tenant: str
    journey_id: str
    version: int
    journey: Journey | None
    created_at: datetime | None = None
    created_by: str | None = None


def tenant_journeys(shipped: dict[str, Journey], latest: list[JourneyVersion]) -> dict[str, Journey]:
    """A tenant's journeys: the shipped maps, each replaced or retired by the tenant's latest stored
    version of the same id, then the tenant's own journeys by id."""
    own = {item.journey_id: item for item in latest}
    journeys = {
        journey_id: own[journey_id].journey if journey_id in own else journey for journey_id, journey in shipped.items()
    }
    journeys.update((journey_id, own[journey_id].journey) for journey_id in sorted(own) if journey_id not in shipped)
    return {journey_id: journey for journey_id, journey in journeys.items() if journey is not None}


class JourneyCatalog:
    """The journeys of each tenant, as last loaded: the shipped maps for a tenant without stored
    versions. Reads are synchronous and never touch the database, so they are safe inside a
    transaction; `services.core.db.journeys` loads the stored versions and calls `replace`."""

    def __init__(self, shipped: dict[str, Journey]):
        self.shipped = shipped
        self._by_tenant: dict[str, dict[str, Journey]] = {}
        self._latest: dict[str, list[JourneyVersion]] = {}
        self.loaded = False  # True once the stored versions were read at least once

    def of(self, tenant: str) -> dict[str, Journey]:
        return self._by_tenant.get(tenant, self.shipped)

    def latest(self, tenant: str) -> list[JourneyVersion]:
        """The tenant's latest stored version of each journey it changed (retirements included)."""
        return self._latest.get(tenant, [])

    @property
    def tenants_with_own_maps(self) -> list[str]:
        return sorted(self._by_tenant)

    def replace(self, latest: list[JourneyVersion]) -> None:
        """Install the latest stored version of every (tenant, journey), all tenants at once."""
        by_tenant: dict[str, list[JourneyVersion]] = {}
        for item in latest:
            by_tenant.setdefault(item.tenant, []).append(item)
        self._latest = by_tenant
        self._by_tenant = {tenant: tenant_journeys(self.shipped, items) for tenant, items in by_tenant.items()}
        self.loaded = True
