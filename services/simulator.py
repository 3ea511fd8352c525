"""Realistic touchpoint traffic for `cem simulate` and `cem dev --simulate`: seeded customers
walking the journey maps (JourneySimulator) and an async poster feeding the ingest API (run_simulation)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from statistics import NormalDist
from typing import Any

import httpx
import orjson

from services.core.journeys import Journey, Stage

logger = logging.getLogger("cem.simulate")

__all__ = [
    "DEFAULT_INCIDENT_STAGES",
    "Incident",
    "JourneySimulator",
    "SimulationStats",
    "default_incident",
    "run_simulation",
]

# --------------------------------------------------------------------------------------------
# The population. Scores are modelled on the 0-10 scale relative to the stage's promise:
#   experience  = promise + stage offset + customer leniency + noise - failure - incident
#   expectation = promise + customer expectation bias + noise
# Critical customers are both harder to please and expect more, so their experience index
# settles below zero: they fill the at_risk and disengaged quadrants.

CRITICAL_SHARE = 0.18
LENIENCY_SD = 0.5
CRITICAL_LENIENCY_SHIFT = -1.3
EXPECTATION_BIAS_SD = 0.25
CRITICAL_EXPECTATION_SHIFT = 0.4
EXPECTATION_NOISE_SD = 0.3
EXPERIENCE_NOISE_SD = 0.7
FAILURE_DROP = (3.0, 5.0)  # an occasional service failure: the experience drops by this much
HOT_GAP = (5.2, 7.0)  # an injected hot event falls this far short of the expectation

# Spend per pass through the journey is lognormal: heavy-tailed, a few customers are worth a lot.
# Its median is set so that HIGH_VALUE_SHARE of the customers spend the journey's revenue_threshold
# in one pass; customers who stay for more passes climb above it, newcomers replace leavers.
REVENUE_SIGMA = 1.1
HIGH_VALUE_SHARE = 0.19
REVENUE_NOISE_SIGMA = 0.25
LEAVE_AFTER_PASS = 0.5  # probability that a customer who finished the journey is replaced
REVENUE_STAGE_WORDS = (
    "billing", "booking", "reservation", "subscription", "settlement", "payment", "purchase", "check-out", "checkout",
)  # fmt: skip

SOURCES = ("survey", "behavioural", "review", "mystery_shopper")
SOURCE_WEIGHTS = (0.50, 0.30, 0.12, 0.08)
EMOTION_SHARE = {"survey": 0.7, "review": 0.9, "mystery_shopper": 0.3, "behavioural": 0.1}
SURVEY_EXPECTATION_SHARE = 0.45  # surveys that also ask what the customer expected
SURVEY_FIVE_POINT_SHARE = 0.06  # reviews are always 1-5 stars; a few surveys are too: ~15% in all
FIVE_POINT_SCALE = {"min": 1, "max": 5}
# Touchpoint words that mean a person in front of the customer (channel in_person).
IN_PERSON_WORDS = frozenset(
    {"store", "counter", "desk", "staff", "agent", "attendant", "crew", "centre", "lounge", "gate", "garage"}
)
MAX_DELAY_S = 5.0  # events reach us 0-5 s after they happened

EXPECTATION_REPORTED_SHARE = (
    SOURCE_WEIGHTS[SOURCES.index("survey")] * SURVEY_EXPECTATION_SHARE
    + SOURCE_WEIGHTS[SOURCES.index("mystery_shopper")]
)
_FIVE_POINT_SHARE = SOURCE_WEIGHTS[SOURCES.index("review")] + SOURCE_WEIGHTS[0] * SURVEY_FIVE_POINT_SHARE
# Spread of one event's gap around its stage offset (customer, event noise, expectation, rounding).
GAP_SD = math.sqrt(
    LENIENCY_SD**2
    + EXPERIENCE_NOISE_SD**2
    + EXPECTATION_REPORTED_SHARE * (EXPECTATION_BIAS_SD**2 + EXPECTATION_NOISE_SD**2)
    + _FIVE_POINT_SHARE * 1.25**2 / 6  # 0.5 steps on 1-5 are 1.25 on 0-10, for both scores
)
_FAILURE_MEAN = sum(FAILURE_DROP) / 2
_FAILURE_GAP_SD = math.sqrt(GAP_SD**2 + (FAILURE_DROP[1] - FAILURE_DROP[0]) ** 2 / 12)

# Stage quality profiles: (target shortfall rate as a share of the stage's alert threshold,
# rate of service failures). Offsets are solved from the target, so that no stage of any journey
# map alerts in normal operation, while weak stages' mean gap sits slightly below zero.
STAGE_PROFILES = {"strong": (0.40, 0.02), "normal": (0.55, 0.04), "weak": (0.85, 0.18)}
STRONG_STAGE_SHARE = 0.4

_NORMAL = NormalDist()


# --------------------------------------------------------------------------------------------
# Incidents.


@dataclass(frozen=True)
class Incident:
    """A recurring drop of one stage's experience, to show stage alerts opening and resolving.

    Times are seconds since the simulator's start (the first `now` it was given). During each
    window the stage's experience falls by `severity` points; `hot_event_share` of all events in
    the window are hot events (gap <= -5) from high-revenue customers at that stage.
    """

    journey: str
    stage: str
    start_after_s: float = 20.0
    duration_s: float = 180.0
    period_s: float | None = 600.0  # None: only once
    severity: float = 4.0
    hot_event_share: float = 0.004

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.start_after_s < 0 or self.severity < 0:
            raise ValueError("an incident needs duration_s > 0, start_after_s >= 0 and severity >= 0")
        if self.period_s is not None and self.period_s < self.duration_s:
            raise ValueError(
                f"incident period_s ({self.period_s:g}) is shorter than its duration_s ({self.duration_s:g})"
            )
        if not 0 <= self.hot_event_share <= 1:
            raise ValueError("incident hot_event_share must be within 0-1")

    def active_at(self, elapsed_s: float) -> bool:
        """Whether the incident is under way `elapsed_s` seconds after the simulator's start."""
        since_start_s = elapsed_s - self.start_after_s
        if since_start_s < 0:
            return False
        if self.period_s is None:
            return since_start_s < self.duration_s
        return since_start_s % self.period_s < self.duration_s


# The stage each shipped journey's demo incident hits: the stage its seed case was about.
DEFAULT_INCIDENT_STAGES = {
    "car-rental": "pickup",  # AVIS: time taken to rent
    "hotel": "check-in",
    "airline": "boarding",
    "telecom": "use-network",
}


def default_incident(journeys: Mapping[str, Journey], journey_ids: Sequence[str] | None = None) -> Incident:
    """The demo incident of `cem dev --simulate`: car-rental pickup when car-rental is simulated,
    else the first simulated journey's usual stage (or its heaviest stage)."""
    candidates = list(journey_ids) if journey_ids else list(journeys)
    journey_id = "car-rental" if "car-rental" in candidates else candidates[0]
    journey = journeys[journey_id]
    stage_id = DEFAULT_INCIDENT_STAGES.get(journey_id)
    if stage_id is None or journey.stage(stage_id) is None:
        stage_id = max(journey.stages, key=lambda stage: stage.weight).id
    return Incident(journey=journey_id, stage=stage_id)


# --------------------------------------------------------------------------------------------
# The generator.


@dataclass(frozen=True)
class _StageModel:
    stage: Stage
    index: int
    profile: str
    offset: float  # mean experience above the promise for an average customer
    failure_rate: float
    revenue_share: float  # share of the customer's spend per pass charged at this stage
    touchpoints: tuple[tuple[str, str | None], ...]  # (touchpoint, its obvious channel)


@dataclass(frozen=True)
class _JourneyModel:
    journey: Journey
    stages: tuple[_StageModel, ...]
    median_value: float


@dataclass
class _Customer:
    customer_id: str
    journey: _JourneyModel
    value: float  # spend per pass through the journey
    leniency: float
    expectation_bias: float
    next_stage: int
    revenue: float = 0.0  # revenue sent so far


class JourneySimulator:
    """Seeded traffic: a population of customers, each walking one journey stage by stage.

    Pure: no I/O and no clock; the same seed and the same sequence of `now` values give the
    same events. `customers` is the size of the active population: a customer who finishes the
    journey may leave and be replaced by a newcomer, which keeps the quadrants' shares steady.
    """

    def __init__(
        self,
        journeys: Mapping[str, Journey],
        journey_ids: Sequence[str] | None = None,
        customers: int = 2000,
        seed: int | None = None,
        incident: Incident | Sequence[Incident] | None = None,
        *,
        started_at: datetime | None = None,
        event_id_prefix: str | None = None,
    ) -> None:
        if not journeys:
            raise ValueError("no journeys to simulate")
        ids = list(dict.fromkeys(journey_ids)) if journey_ids else list(journeys)
        unknown = [journey_id for journey_id in ids if journey_id not in journeys]
        if unknown:
            raise ValueError(
                f"unknown journey {', '.join(map(repr, unknown))}; known journeys: {', '.join(sorted(journeys))}"
            )
        if customers < 1:
            raise ValueError("customers must be at least 1")
        if started_at is not None and started_at.tzinfo is None:
            raise ValueError("started_at must be timezone-aware")

        # A random seed unless one is given: restarts then create new customers and new event ids.
        self.seed = secrets.randbelow(1_000_000) if seed is None else seed
        self.incidents: tuple[Incident, ...] = (
            () if incident is None else (incident,) if isinstance(incident, Incident) else tuple(incident)
        )
        self.started_at = started_at
        self._event_id_prefix = event_id_prefix
        self._rng = random.Random(self.seed)
        self._counter = 0
        self._customers_created = 0

        incident_stages = {(item.journey, item.stage) for item in self.incidents}
        self._journeys = [self._model_journey(journeys[journey_id], incident_stages) for journey_id in ids]
        by_id = {model.journey.id: model for model in self._journeys}
        self._incident_targets: list[tuple[Incident, _JourneyModel, int]] = []
        for item in self.incidents:
            model = by_id.get(item.journey)
            if model is None:
                raise ValueError(f"incident journey '{item.journey}' is not simulated; simulated: {', '.join(by_id)}")
            stage = model.journey.stage(item.stage)
            if stage is None:
                raise ValueError(
                    f"unknown incident stage '{item.stage}' in journey '{item.journey}'; "
                    f"known stages: {', '.join(model.journey.stage_ids)}"
                )
            self._incident_targets.append((item, model, model.journey.stage_ids.index(stage.id)))

        # The first customers are already somewhere along their journey.
        self._population = [
            self._new_customer(model, self._rng.randrange(len(model.stages)))
            for model in (self._rng.choice(self._journeys) for _ in range(customers))
        ]

    # ---- public

    @property
    def events_generated(self) -> int:
        return self._counter

    def active_incidents(self, at: datetime) -> list[Incident]:
        """The incidents under way at `at` (only known once the simulator has started)."""
        if self.started_at is None:
            return []
        elapsed_s = (at - self.started_at).total_seconds()
        return [item for item in self.incidents if item.active_at(elapsed_s)]

    def stage_profiles(self) -> dict[tuple[str, str], str]:
        """(journey, stage) -> 'strong', 'normal' or 'weak': how well each stage usually does."""
        return {
            (model.journey.id, stage.stage.id): stage.profile for model in self._journeys for stage in model.stages
        }

    def next_events(self, now: datetime, count: int) -> list[dict[str, Any]]:
        """`count` events that happened in the 5 s before `now`, as posted to the ingest API."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if self.started_at is None:
            self.started_at = now
        if self._event_id_prefix is None:
            # The start time makes event ids unique across runs with the same seed.
            self._event_id_prefix = f"sim-{self.seed}-{_base36(int(self.started_at.timestamp() * 1000))}"
        return [self._next_event(now) for _ in range(count)]

    # ---- building the model

    def _model_journey(self, journey: Journey, incident_stages: set[tuple[str, str]]) -> _JourneyModel:
        rng = self._rng
        stages = journey.stages
        incident_indexes = {index for index, stage in enumerate(stages) if (journey.id, stage.id) in incident_stages}
        # One or two chronically weak stages, among those whose alert rule tolerates most shortfall;
        # never an incident stage, whose contrast between normal and incident must stay clear.
        others = [index for index in range(len(stages)) if index not in incident_indexes]
        weak_count = min(len(others), 1 if len(stages) < 6 else rng.choice((1, 2)))
        ranked = sorted(others, key=lambda index: (-stages[index].alert.shortfall_rate_above, rng.random()))
        weak = set(ranked[:weak_count])

        revenue_indexes = [
            index for index, stage in enumerate(stages) if any(word in stage.id for word in REVENUE_STAGE_WORDS)
        ] or [len(stages) - 1]
        models = []
        for index, stage in enumerate(stages):
            if index in incident_indexes:
                profile = "strong"
            elif index in weak:
                profile = "weak"
            else:
                profile = "strong" if rng.random() < STRONG_STAGE_SHARE else "normal"
            target_share, failure_rate = STAGE_PROFILES[profile]
            target = stage.alert.shortfall_rate_above * target_share * rng.uniform(0.9, 1.0)
            models.append(
                _StageModel(
                    stage=stage,
                    index=index,
                    profile=profile,
                    offset=_stage_offset(target, failure_rate, stage.alert.mean_gap_below),
                    failure_rate=failure_rate,
                    revenue_share=1.0 / len(revenue_indexes) if index in revenue_indexes else 0.0,
                    touchpoints=tuple((touchpoint, _channel_of(touchpoint)) for touchpoint in stage.touchpoints),
                )
            )
        median_value = journey.revenue_threshold * math.exp(-_NORMAL.inv_cdf(1 - HIGH_VALUE_SHARE) * REVENUE_SIGMA)
        return _JourneyModel(journey=journey, stages=tuple(models), median_value=median_value)

    def _new_customer(self, model: _JourneyModel, next_stage: int) -> _Customer:
        rng = self._rng
        number = self._customers_created
        self._customers_created += 1
        critical = rng.random() < CRITICAL_SHARE
        return _Customer(
            customer_id=f"cust-{self.seed}-{number:05d}",
            journey=model,
            value=model.median_value * math.exp(rng.gauss(0.0, REVENUE_SIGMA)),
            leniency=rng.gauss(0.0, LENIENCY_SD) + (CRITICAL_LENIENCY_SHIFT if critical else 0.0),
            expectation_bias=rng.gauss(0.0, EXPECTATION_BIAS_SD) + (CRITICAL_EXPECTATION_SHIFT if critical else 0.0),
            next_stage=next_stage,
        )

    # ---- one event

    def _next_event(self, now: datetime) -> dict[str, Any]:
        rng = self._rng
        assert self.started_at is not None
        occurred_at = now - timedelta(seconds=rng.uniform(0.0, MAX_DELAY_S))
        elapsed_s = (occurred_at - self.started_at).total_seconds()
        active = [target for target in self._incident_targets if target[0].active_at(elapsed_s)]

        slot, hot = self._pick_customer(active)
        customer = self._population[slot]
        model = customer.journey
        stage = model.stages[customer.next_stage]
        incident_drop = sum(
            item.severity for item, target, index in active if target is model and index == stage.index
        )
        event = self._event(customer, stage, occurred_at, incident_drop, hot)

        customer.next_stage += 1
        if customer.next_stage == len(model.stages):
            customer.next_stage = 0
            if rng.random() < LEAVE_AFTER_PASS:
                self._population[slot] = self._new_customer(model, 0)
        return event

    def _pick_customer(self, active: list[tuple[Incident, _JourneyModel, int]]) -> tuple[int, bool]:
        rng = self._rng
        for item, model, stage_index in active:
            if item.hot_event_share and rng.random() < item.hot_event_share:
                threshold = model.journey.revenue_threshold
                candidates = [
                    slot
                    for slot, customer in enumerate(self._population)
                    if customer.journey is model
                    and customer.next_stage == stage_index
                    and customer.revenue >= threshold
                ]
                if candidates:
                    return rng.choice(candidates), True
        return rng.randrange(len(self._population)), False

    def _event(
        self, customer: _Customer, stage: _StageModel, occurred_at: datetime, incident_drop: float, hot: bool
    ) -> dict[str, Any]:
        rng = self._rng
        promise = stage.stage.promise
        source = "survey" if hot else rng.choices(SOURCES, SOURCE_WEIGHTS)[0]
        five_point = not hot and (
            source == "review" or (source == "survey" and rng.random() < SURVEY_FIVE_POINT_SHARE)
        )
        reports_expectation = (
            hot or source == "mystery_shopper" or (source == "survey" and rng.random() < SURVEY_EXPECTATION_SHARE)
        )

        # A mystery shopper checks the promise itself; customers bring their own expectation.
        if source == "mystery_shopper":
            expectation = promise
        else:
            expectation = _clip(promise + customer.expectation_bias + rng.gauss(0.0, EXPECTATION_NOISE_SD))
        experience = promise + stage.offset + customer.leniency + rng.gauss(0.0, EXPERIENCE_NOISE_SD) - incident_drop
        if rng.random() < stage.failure_rate:
            experience -= rng.uniform(*FAILURE_DROP)

        if five_point:
            experience_value = _to_five_point(experience)
            expectation_value = _to_five_point(expectation)
            recorded_experience = (experience_value - 1) * 2.5
            recorded_expectation = (expectation_value - 1) * 2.5
        else:
            expectation_value = round(expectation, 1)
            if hot:
                experience = expectation_value - rng.uniform(*HOT_GAP)
            experience_value = round(_clip(experience), 1)
            recorded_experience, recorded_expectation = experience_value, expectation_value
        gap = recorded_experience - (recorded_expectation if reports_expectation else promise)

        touchpoint, channel = rng.choice(stage.touchpoints) if stage.touchpoints else (None, None)
        if channel is None:
            channel = rng.choice(("in_person", "in_person", "app", "web", "other"))

        self._counter += 1
        event: dict[str, Any] = {
            "event_id": f"{self._event_id_prefix}-{self._counter}",
            "occurred_at": occurred_at.isoformat(timespec="milliseconds"),
            "customer_id": customer.customer_id,
            "journey": customer.journey.journey.id,
            "stage": stage.stage.id,
        }
        if touchpoint is not None:
            event["touchpoint"] = touchpoint
        event["channel"] = channel
        event["source"] = source
        event["experience"] = experience_value
        if reports_expectation:
            event["expectation"] = expectation_value
        if five_point:
            event["scale"] = dict(FIVE_POINT_SCALE)
        if rng.random() < EMOTION_SHARE[source]:
            event["emotion"] = _emotion(gap + rng.gauss(0.0, 0.6))
        if stage.revenue_share:
            amount = round(customer.value * stage.revenue_share * math.exp(rng.gauss(0.0, REVENUE_NOISE_SIGMA)), 2)
            customer.revenue += amount
            event["revenue"] = amount
        event["attributes"] = {"simulated": True}
        return event


def _stage_offset(target_shortfall: float, failure_rate: float, mean_gap_below: float) -> float:
    """The stage offset whose expected shortfall rate (share of events with gap < 0) is the target.

    The gap of one event is roughly normal around offset + the customer's shift (two groups:
    ordinary and critical customers), or, after a service failure, around that minus the drop.
    The rate falls as the offset rises, so bisection finds it.
    """

    def shortfall_rate(offset: float) -> float:
        rate = 0.0
        for share, shift in (
            (1 - CRITICAL_SHARE, 0.0),
            (CRITICAL_SHARE, CRITICAL_LENIENCY_SHIFT - EXPECTATION_REPORTED_SHARE * CRITICAL_EXPECTATION_SHIFT),
        ):
            mean = offset + shift
            usual = _NORMAL.cdf(-mean / GAP_SD)
            failed = _NORMAL.cdf(-(mean - _FAILURE_MEAN) / _FAILURE_GAP_SD)
            rate += share * ((1 - failure_rate) * usual + failure_rate * failed)
        return rate

    low, high = -3.0, 6.0
    for _ in range(40):
        middle = (low + high) / 2
        if shortfall_rate(middle) > target_shortfall:
            low = middle
        else:
            high = middle
    # Keep the mean gap clear of the stage's mean-gap alert rule as well.
    mean_shift = (
        CRITICAL_SHARE * (CRITICAL_LENIENCY_SHIFT - EXPECTATION_REPORTED_SHARE * CRITICAL_EXPECTATION_SHIFT)
        - failure_rate * _FAILURE_MEAN
    )
    return max(high, mean_gap_below + 1.0 - mean_shift)


def _channel_of(touchpoint: str) -> str | None:
    """The channel a touchpoint obviously belongs to, or None when it could be any."""
    words = set(touchpoint.split("-"))
    if words & {"web", "online", "site"}:
        return "web"
    if "app" in words:
        return "app"
    if "email" in words:
        return "email"
    if "chat" in words:
        return "chat"
    if touchpoint in ("call-centre", "outbound-call") or words & {"hotline", "phone"}:
        return "call_centre"
    if "kiosk" in words or touchpoint.startswith("self-"):
        return "kiosk"
    if "terminal" in words:
        return "pos"
    if "sms" in words:
        return "other"
    if words & IN_PERSON_WORDS:
        return "in_person"
    return None


def _emotion(felt_gap: float) -> str:
    if felt_gap <= -3.5:
        return "angry"
    if felt_gap <= -2.0:
        return "frustrated"
    if felt_gap <= -0.8:
        return "annoyed"
    if felt_gap < 0.8:
        return "neutral"
    if felt_gap < 2.2:
        return "pleased"
    return "delighted"


def _clip(score: float) -> float:
    return min(10.0, max(0.0, score))


def _to_five_point(score: float) -> float:
    """A 0-10 score as a 1-5 rating, in half points."""
    return round((1 + _clip(score) * 0.4) * 2) / 2


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if number == 0:
            return text


# --------------------------------------------------------------------------------------------
# The poster.

MAX_BATCH_EVENTS = 1000  # the ingest API's batch limit (SPEC 4)
MAX_BACKLOG_S = 1.0  # after a stall, catch up at most this much; never burst a whole outage
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class SimulationStats:
    events: int = 0  # generated and handed to the poster
    accepted: int = 0
    rejected: int = 0  # refused by validation (422 or per-event in a 202)
    failed: int = 0  # not delivered: gave up after retries, or a non-retryable error
    requests: int = 0  # HTTP responses received
    retries: int = 0
    elapsed_s: float = 0.0

    def line(self) -> str:
        return (
            f"events={self.events} accepted={self.accepted} rejected={self.rejected} failed={self.failed} "
            f"requests={self.requests} retries={self.retries}"
        )


async def _stopped_within(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep up to delay_s; True as soon as `stop` is set."""
    if delay_s <= 0:
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
    except TimeoutError:
        return False
    return True


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _BatchPoster:
    """Posts one batch until it is answered, retrying transient failures with the same event ids."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        stats: SimulationStats,
        stop: asyncio.Event,
        max_attempts: int,
        backoff_s: float,
        max_backoff_s: float,
    ) -> None:
        self.client, self.url, self.stats, self.stop = client, url, stats, stop
        self.max_attempts, self.backoff_s, self.max_backoff_s = max_attempts, backoff_s, max_backoff_s
        self._unreachable = False
        self._reported: set[str] = set()

    def _report_once(self, key: str, level: int, message: str, *args: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            logger.log(level, message, *args)

    async def post(self, events: list[dict[str, Any]]) -> None:
        try:
            await self._post(events)
        except Exception:
            logger.exception("posting a batch of %d events failed", len(events))
            self.stats.failed += len(events)

    async def _post(self, events: list[dict[str, Any]]) -> None:
        body = orjson.dumps({"events": events})
        backoff_s = self.backoff_s
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self.stats.retries += 1
            try:
                response = await self.client.post(self.url, content=body, headers=JSON_HEADERS)
            except httpx.TransportError as error:
                if not self._unreachable:
                    self._unreachable = True
                    logger.info("ingest at %s is not reachable yet (%s); retrying", self.url, type(error).__name__)
                delay_s = backoff_s
            else:
                self.stats.requests += 1
                if self._unreachable:
                    self._unreachable = False
                    logger.info("ingest at %s is reachable", self.url)
                if response.status_code == 202 or response.status_code == 422:
                    self._count_answer(response, events)
                    return
                if response.status_code not in RETRYABLE_STATUSES:
                    self._report_once(
                        f"status-{response.status_code}", logging.ERROR,
                        "ingest answered %d to a batch; not retrying: %s", response.status_code, response.text[:500],
                    )  # fmt: skip
                    self.stats.failed += len(events)
                    return
                self._report_once(
                    f"status-{response.status_code}", logging.WARNING,
                    "ingest answered %d; retrying with the same event ids", response.status_code,
                )  # fmt: skip
                retry_after_s = _retry_after_s(response)
                delay_s = backoff_s if retry_after_s is None else retry_after_s
            if attempt == self.max_attempts:
                break
            backoff_s = min(backoff_s * 2, self.max_backoff_s)
            if await _stopped_within(self.stop, min(delay_s, self.max_backoff_s)):
                break
        self.stats.failed += len(events)

    def _count_answer(self, response: httpx.Response, events: list[dict[str, Any]]) -> None:
        try:
            outcome = response.json()
            accepted, rejected = int(outcome["accepted"]), int(outcome["rejected"])
        except (ValueError, KeyError, TypeError):
            # The status alone is the contract: 202 means written, 422 means none was valid.
            accepted, rejected = (len(events), 0) if response.status_code == 202 else (0, len(events))
            outcome = {}
        self.stats.accepted += accepted
        self.stats.rejected += rejected
        if rejected:
            first = next((item for item in outcome.get("results", ()) if item.get("status") != "accepted"), None)
            self._report_once(
                "rejected", logging.WARNING, "ingest rejected %d simulated events, e.g. %s", rejected, first
            )


async def run_simulation(
    ingest_url: str,
    simulator: JourneySimulator,
    rate: float,
    duration_s: float | None = None,
    batch_size: int = 200,
    stop: asyncio.Event | None = None,
    headers: dict[str, str] | None = None,
    *,
    max_attempts: int = 8,
    backoff_s: float = 0.5,
    max_backoff_s: float = 15.0,
    max_in_flight: int = 4,
    progress_interval_s: float = 10.0,
    timeout_s: float = 10.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SimulationStats:
    """Post the simulator's events to `POST {ingest_url}/v1/events:batch` at `rate` events/s.

    Paced on the loop clock, min(batch_size, ceil(rate)) events per tick, at most `max_in_flight`
    requests at once (a slow ingest slows the simulation rather than piling up batches). 503, 429
    and other transient answers are retried after their Retry-After with the same events, and
    connection errors (ingest still starting) with exponential backoff, up to `max_attempts`
    per batch. Runs until `stop` is set or `duration_s` has passed.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if max_attempts < 1 or max_in_flight < 1:
        raise ValueError("max_attempts and max_in_flight must be at least 1")
    per_tick = max(1, min(batch_size, MAX_BATCH_EVENTS, math.ceil(rate)))
    interval_s = per_tick / rate
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    stats = SimulationStats()
    url = ingest_url.rstrip("/") + "/v1/events:batch"
    in_flight = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        in_flight.release()

    started_s = loop.time()
    next_tick_s = started_s
    progress_at_s, progress_events = started_s, 0
    logger.info(
        "simulating %.0f events/s to %s (seed %d, %d events per batch)", rate, url, simulator.seed, per_tick
    )
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, transport=transport) as client:
        poster = _BatchPoster(client, url, stats, stop, max_attempts, backoff_s, max_backoff_s)
        try:
            while not stop.is_set():
                now_s = loop.time()
                if duration_s is not None and now_s - started_s >= duration_s:
                    break
                if now_s < next_tick_s:
                    wait_s = next_tick_s - now_s
                    if duration_s is not None:
                        wait_s = min(wait_s, started_s + duration_s - now_s)
                    if await _stopped_within(stop, wait_s):
                        break
                    continue
                next_tick_s = max(next_tick_s + interval_s, now_s - MAX_BACKLOG_S)
                await in_flight.acquire()
                if stop.is_set():
                    in_flight.release()
                    break
                events = simulator.next_events(datetime.now(timezone.utc), per_tick)
                stats.events += len(events)
                task = asyncio.create_task(poster.post(events))
                tasks.add(task)
                task.add_done_callback(finished)

                if now_s - progress_at_s >= progress_interval_s:
                    window_s = now_s - progress_at_s
                    logger.info(
                        "simulate: %.0f events/s over the last %.1f s; %s",
                        (stats.events - progress_events) / window_s, window_s, stats.line(),
                    )  # fmt: skip
                    progress_at_s, progress_events = now_s, stats.events
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
    stats.elapsed_s = loop.time() - started_s
    logger.info("simulation finished after %.1f s: %s", stats.elapsed_s, stats.line())
    return stats
