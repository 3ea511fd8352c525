"""The alert rules (SPEC 7): what fires, how bad it is, and which status changes are legal. Pure.

Three kinds, each about one subject:

- `customer_at_risk` (subject: the customer id) fires while the customer's quadrant is `at_risk`
  (index below the experience threshold, revenue at or above the revenue threshold of the journey
  of their latest event) and resolves by itself when they leave it;
- `customer_hot` (subject: the customer id) fires on one event with gap <= -5 from a customer
  whose revenue, valued now, is at or above the revenue threshold of the event's journey. It is a
  call to the frontline and is resolved by a person, never by itself;
- `stage_shortfall` (subject: `journey/stage`) fires while the stage's window (1 h) has at least
  `min_events` events and its mean gap is at or below `mean_gap_below` or its shortfall rate at
  or above `shortfall_rate_above`. It resolves by itself once the stage has recovered: the mean gap
  is more than RECOVERY_GAP_MARGIN above its limit and the shortfall rate more than
  RECOVERY_RATE_MARGIN below its limit, or the window holds fewer than `min_events` (traffic
  stopped). The margins keep a stage that hovers at a limit from opening and resolving an alert
  with every batch; in between, an open alert stays open and its figures are updated.

Severity is the value at stake against the journey's revenue threshold T: the customer's revenue
for the customer kinds, the revenue of the stage's window events for a stage. At or above 10 T is
`critical`, 3 T `high`, T `medium`, below T `low` (a customer alert always has revenue >= T, so it
is at least `medium`). A journey with T = 0 has no scale: its alerts are `medium`.

An evaluation produces a `Finding` per subject (the rule holds or not, with the figures); `plan`
turns a finding and the status of the subject's unresolved alert into open, update or resolve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

KINDS = ("customer_at_risk", "customer_hot", "stage_shortfall")
CUSTOMER_KINDS = ("customer_at_risk", "customer_hot")
STATUSES = ("open", "acknowledged", "resolved")
SEVERITIES = ("critical", "high", "medium", "low")
AUTO_RESOLVING = frozenset({"customer_at_risk", "stage_shortfall"})

HOT_GAP = -5.0  # an event this far (or further) below expectation is a hot alert
SEVERITY_MULTIPLES = (("critical", 10.0), ("high", 3.0), ("medium", 1.0))
MAX_EVIDENCE_EVENTS = 10  # event ids kept in the evidence of one alert
RECOVERY_GAP_MARGIN = 0.25  # gap points above mean_gap_below for a stage to count as recovered
RECOVERY_RATE_MARGIN = 0.05  # below shortfall_rate_above, likewise


def severity(value_at_stake: float, revenue_threshold: float) -> str:
    """critical / high / medium / low from the value at stake in multiples of the threshold."""
    if revenue_threshold <= 0:
        return "medium"
    ratio = value_at_stake / revenue_threshold
    for name, multiple in SEVERITY_MULTIPLES:
        if ratio >= multiple:
            return name
    return "low"


def stage_subject(journey: str, stage: str) -> str:
    return f"{journey}/{stage}"


def parse_stage_subject(subject: str) -> tuple[str, str]:
    journey, _, stage = subject.partition("/")  # journey ids are slugs: never a '/'
    return journey, stage


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------------------------
# Findings.


@dataclass(frozen=True)
class Finding:
    """What one evaluation found about one subject: does the rule hold, with which figures."""

    kind: str
    subject: str
    journey: str
    firing: bool  # the rule holds: open an alert, or update the unresolved one
    recovered: bool  # the subject is clear of the rule: an unresolved alert of an auto-resolving kind resolves
    severity: str
    revenue_at_stake: float
    evidence: dict[str, Any]
    reason: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.subject)


def customer_at_risk(
    customer_id: str,
    journey: str,
    quadrant: str,
    experience_index: float,
    revenue: float,
    experience_threshold: float,
    revenue_threshold: float,
    events: int,
    last_event_id: str,
) -> Finding:
    firing = quadrant == "at_risk"
    evidence = {
        "quadrant": quadrant,
        "experience_index": _round(experience_index),
        "revenue": _round(revenue, 2),
        "experience_threshold": experience_threshold,
        "revenue_threshold": revenue_threshold,
        "events": events,
        "last_event_id": last_event_id,
    }
    if firing:
        reason = (
            f"customer is at_risk in {journey}: experience index {experience_index:.2f} below "
            f"{experience_threshold:g}, revenue {revenue:.2f} at or above {revenue_threshold:g}"
        )
    else:
        reason = (
            f"customer left at_risk: now {quadrant} "
            f"(experience index {experience_index:.2f}, revenue {revenue:.2f})"
        )
    return Finding(
        kind="customer_at_risk",
        subject=customer_id,
        journey=journey,
        firing=firing,
        recovered=not firing,
        severity=severity(revenue, revenue_threshold),
        revenue_at_stake=revenue,
        evidence=evidence,
        reason=reason,
    )


@dataclass(frozen=True)
class HotEvent:
    event_id: str
    journey: str
    stage: str
    touchpoint: str
    channel: str
    gap: float
    occurred_at: datetime
    revenue_threshold: float  # the event's journey's

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "journey": self.journey,
            "stage": self.stage,
            "touchpoint": self.touchpoint or None,
            "channel": self.channel or None,
            "gap": _round(self.gap),
            "occurred_at": self.occurred_at.isoformat(),
        }


def customer_hot(customer_id: str, revenue: float, events: list[HotEvent]) -> Finding | None:
    """A hot alert if one of the customer's new events has gap <= HOT_GAP while their revenue (valued
    now) is at or above the threshold of that event's journey; None otherwise (a hot alert never
    resolves by itself, so there is nothing to say when the rule does not hold)."""
    hot = sorted(
        (event for event in events if event.gap <= HOT_GAP and revenue >= event.revenue_threshold),
        key=lambda event: (event.gap, event.event_id),
    )
    if not hot:
        return None
    worst = hot[0]
    return Finding(
        kind="customer_hot",
        subject=customer_id,
        journey=worst.journey,
        firing=True,
        recovered=False,
        severity=severity(revenue, worst.revenue_threshold),
        revenue_at_stake=revenue,
        evidence={
            "revenue": _round(revenue, 2),
            "revenue_threshold": worst.revenue_threshold,
            "hot_gap": HOT_GAP,
            "worst_gap": _round(worst.gap),
            "events": [event.to_dict() for event in hot[:MAX_EVIDENCE_EVENTS]],
        },
        reason=(
            f"hot event {worst.event_id} at {worst.journey}/{worst.stage}: gap {worst.gap:.2f} <= {HOT_GAP:g} "
            f"from a customer with revenue {revenue:.2f} (threshold {worst.revenue_threshold:g})"
        ),
    )


class StageRule(Protocol):
    mean_gap_below: float
    shortfall_rate_above: float
    min_events: int


@dataclass(frozen=True)
class StageWindow:
    """The sums of a stage's buckets over the alert window."""

    events: int = 0
    gap_sum: float = 0.0
    shortfall_events: int = 0
    revenue: float = 0.0
    last_event_ids: tuple[str, ...] = field(default=())

    @property
    def mean_gap(self) -> float | None:
        return self.gap_sum / self.events if self.events else None

    @property
    def shortfall_rate(self) -> float | None:
        return self.shortfall_events / self.events if self.events else None


def stage_breaches(window: StageWindow, rule: StageRule) -> list[str]:
    """Which limits the window breaks (empty: the stage is fine, or has too few events to say)."""
    if window.events < rule.min_events:
        return []
    breaches = []
    if window.mean_gap <= rule.mean_gap_below:
        breaches.append("mean_gap")
    if window.shortfall_rate >= rule.shortfall_rate_above:
        breaches.append("shortfall_rate")
    return breaches


def stage_recovered(window: StageWindow, rule: StageRule) -> bool:
    """Clear of both limits by the recovery margins, or too few events to say the stage fails."""
    if window.events < rule.min_events:
        return True
    return (
        window.mean_gap > rule.mean_gap_below + RECOVERY_GAP_MARGIN
        and window.shortfall_rate < rule.shortfall_rate_above - RECOVERY_RATE_MARGIN
    )


def format_minutes(minutes: int) -> str:
    if minutes % 1440 == 0:
        return f"{minutes // 1440}d"
    if minutes % 60 == 0:
        return f"{minutes // 60}h"
    return f"{minutes}m"


def stage_shortfall(
    journey: str, stage: str, window: StageWindow, rule: StageRule, revenue_threshold: float, window_minutes: int
) -> Finding:
    breaches = stage_breaches(window, rule)
    recovered = stage_recovered(window, rule)
    label = format_minutes(window_minutes)
    evidence = {
        "window": label,
        "events": window.events,
        "mean_gap": _round(window.mean_gap),
        "shortfall_rate": _round(window.shortfall_rate),
        "revenue": _round(window.revenue, 2),
        "mean_gap_below": rule.mean_gap_below,
        "shortfall_rate_above": rule.shortfall_rate_above,
        "min_events": rule.min_events,
        "breaches": breaches,
        "recovered": recovered,
    }
    if window.last_event_ids:
        evidence["last_event_ids"] = list(window.last_event_ids[:MAX_EVIDENCE_EVENTS])
    subject = stage_subject(journey, stage)
    if window.events < rule.min_events:
        reason = (
            f"{subject}: {window.events} events in the last {label}, "
            f"fewer than the {rule.min_events} the rule needs"
        )
    elif breaches:
        reason = (
            f"{subject} falls short over the last {label}: mean gap {window.mean_gap:.2f} "
            f"(limit {rule.mean_gap_below:g}), shortfall rate {window.shortfall_rate:.2f} "
            f"(limit {rule.shortfall_rate_above:g}) over {window.events} events"
        )
    else:
        reason = (
            f"{subject} {'recovered' if recovered else 'back within its limits, not yet clear of them'} "
            f"over the last {label}: mean gap {window.mean_gap:.2f} (limit {rule.mean_gap_below:g}), "
            f"shortfall rate {window.shortfall_rate:.2f} (limit {rule.shortfall_rate_above:g}) "
            f"over {window.events} events"
        )
    return Finding(
        kind="stage_shortfall",
        subject=subject,
        journey=journey,
        firing=bool(breaches),
        recovered=recovered,
        severity=severity(window.revenue, revenue_threshold),
        revenue_at_stake=window.revenue,
        evidence=evidence,
        reason=reason,
    )


def with_earlier_event_ids(evidence: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
    """An update's evidence: the latest events of the batch that judged it first, then those the
    alert named before, up to MAX_EVIDENCE_EVENTS. A batch holds only its own partitions' events, so
    with several consumers the events that keep a stage failing come from several batches; a
    re-evaluation without new events keeps the ids it had."""
    earlier_ids = (earlier or {}).get("last_event_ids") or []
    ids = list(evidence.get("last_event_ids") or [])
    merged = ids + [event_id for event_id in earlier_ids if event_id not in ids]
    if not merged:
        return evidence
    return {**evidence, "last_event_ids": merged[:MAX_EVIDENCE_EVENTS]}


# --------------------------------------------------------------------------------------------
# Status changes.


def plan(finding: Finding, current_status: str | None) -> str | None:
    """What a finding does to its subject's unresolved alert (current_status None: there is none):
    'open' a new one, 'update' its figures, 'resolve' it, or nothing."""
    if current_status is None:
        return "open" if finding.firing else None
    if finding.firing:
        return "update"
    if finding.kind not in AUTO_RESOLVING:
        return None  # resolved by a person
    return "resolve" if finding.recovered else "update"


class IllegalTransition(ValueError):
    """A person asked for a status change the alert's status does not allow; says why."""


COMMANDS = {"acknowledge": "acknowledged", "resolve": "resolved"}


def manual_transition(current_status: str, command: str) -> str:
    """The status after a person's `acknowledge` or `resolve`, or IllegalTransition saying why.

    open -> acknowledged -> resolved, or open -> resolved. Every legal call changes the status:
    acknowledging twice or resolving twice is refused, so each transition is recorded once.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    if current_status == "resolved":
        if command == "resolve":
            raise IllegalTransition("the alert is already resolved")
        raise IllegalTransition("a resolved alert cannot be acknowledged")
    if command == "acknowledge" and current_status == "acknowledged":
        raise IllegalTransition("the alert is already acknowledged")
    return COMMANDS[command]


# --------------------------------------------------------------------------------------------
# Documents: the one JSON shape of an alert and of a transition (API, SSE, Kafka, webhooks).


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def alert_document(row: Any) -> dict[str, Any]:
    """An alert as JSON from any row-like object with the alerts columns."""
    revenue = row.revenue_at_stake
    return {
        "id": str(row.id),
        "kind": row.kind,
        "subject": row.subject,
        "journey": row.journey,
        "severity": row.severity,
        "status": row.status,
        "opened_at": _iso(row.opened_at),
        "updated_at": _iso(row.updated_at),
        "acknowledged_at": _iso(row.acknowledged_at),
        "resolved_at": _iso(row.resolved_at),
        "revenue_at_stake": revenue if math.isfinite(revenue) else None,
        "evidence": row.evidence,
        "acknowledged_by": row.acknowledged_by,
        "resolved_by": row.resolved_by,
        "note": row.note,
    }


def transition_payload(alert: dict[str, Any], reason: str, by: str | None = None, note: str | None = None) -> dict:
    """What alert_transitions.payload holds: the alert after the change, and why it changed."""
    return {"alert": alert, "reason": reason, "by": by, "note": note}


def transition_document(row: Any) -> dict[str, Any]:
    """A transition as published (SSE data, Kafka value, webhook body), from an alert_transitions row."""
    payload = row.payload
    return {
        "seq": row.seq,
        "tenant": row.tenant,
        "alert_id": str(row.alert_id),
        "kind": row.kind,
        "subject": row.subject,
        "from": row.from_status,
        "to": row.to_status,
        "at": _iso(row.at),
        "reason": payload.get("reason"),
        "by": payload.get("by"),
        "note": payload.get("note"),
        "alert": payload.get("alert"),
    }
