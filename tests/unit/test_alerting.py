"""The alert rules (services.core.alerting): what fires, how bad it is, which status changes are legal."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core import alerting
from services.core.alerting import (
    HotEvent,
    IllegalTransition,
    StageWindow,
    customer_at_risk,
    customer_hot,
    manual_transition,
    plan,
    severity,
    stage_shortfall,
)
from services.core.journeys import StageAlertRule

AT = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
RULE = StageAlertRule(mean_gap_below=-1.5, shortfall_rate_above=0.4, min_events=20)


def hot_event(event_id: str, gap: float, threshold: float = 1000.0, journey: str = "car-rental") -> HotEvent:
    return HotEvent(event_id, journey, "pickup", "rental-counter", "in_person", gap, AT, threshold)


# --------------------------------------------------------------------------------------------
# Severity.


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.0, "low"), (999.99, "low"), (1000.0, "medium"), (2999.0, "medium"), (3000.0, "high"),
     (9999.0, "high"), (10_000.0, "critical"), (1e9, "critical")],
)  # fmt: skip
def test_severity_is_the_value_at_stake_in_multiples_of_the_revenue_threshold(value, expected):
    assert severity(value, 1000.0) == expected


def test_a_journey_without_a_revenue_threshold_has_medium_alerts():
    assert severity(0.0, 0.0) == severity(5e6, 0.0) == "medium"


@given(st.floats(0, 1e9), st.floats(0, 1e9), st.floats(1, 1e6))
def test_more_value_at_stake_is_never_less_severe(a, b, threshold):
    rank = {name: index for index, name in enumerate(reversed(alerting.SEVERITIES))}
    low, high = sorted((a, b))
    assert rank[severity(low, threshold)] <= rank[severity(high, threshold)]


# --------------------------------------------------------------------------------------------
# customer_at_risk.


def test_an_at_risk_customer_fires_with_revenue_at_stake_and_the_figures():
    finding = customer_at_risk("C-1", "car-rental", "at_risk", -2.5, 4200.0, 0.0, 1000.0, 7, "e-9")
    assert finding.firing and finding.kind == "customer_at_risk" and finding.subject == "C-1"
    assert finding.revenue_at_stake == 4200.0 and finding.severity == "high"
    assert finding.evidence == {
        "quadrant": "at_risk", "experience_index": -2.5, "revenue": 4200.0, "experience_threshold": 0.0,
        "revenue_threshold": 1000.0, "events": 7, "last_event_id": "e-9",
    }  # fmt: skip
    assert "at_risk" in finding.reason and "-2.50" in finding.reason


@pytest.mark.parametrize("quadrant", ["exemplary", "growth", "disengaged"])
def test_a_customer_in_another_quadrant_does_not_fire_and_says_where_they_are(quadrant):
    finding = customer_at_risk("C-1", "car-rental", quadrant, 1.0, 100.0, 0.0, 1000.0, 3, "e-3")
    assert not finding.firing
    assert quadrant in finding.reason


# --------------------------------------------------------------------------------------------
# customer_hot.


def test_a_hot_event_from_a_high_revenue_customer_fires_with_the_worst_event_first():
    events = [hot_event("e-1", -5.0), hot_event("e-2", -7.5), hot_event("e-3", -1.0)]
    finding = customer_hot("C-7", 1500.0, events)
    assert finding is not None and finding.firing and finding.kind == "customer_hot"
    assert finding.severity == "medium" and finding.revenue_at_stake == 1500.0
    assert [event["event_id"] for event in finding.evidence["events"]] == ["e-2", "e-1"]  # e-3 is not hot
    assert finding.evidence["worst_gap"] == -7.5 and "e-2" in finding.reason


def test_no_hot_alert_below_the_revenue_threshold_or_above_the_hot_gap():
    assert customer_hot("C-7", 999.0, [hot_event("e-1", -9.0)]) is None
    assert customer_hot("C-7", 5000.0, [hot_event("e-1", -4.99)]) is None
    assert customer_hot("C-7", 5000.0, []) is None


def test_each_hot_event_is_judged_by_the_threshold_of_its_own_journey():
    events = [hot_event("cheap", -6.0, 1000.0, "car-rental"), hot_event("dear", -8.0, 3000.0, "airline")]
    finding = customer_hot("C-7", 2000.0, events)
    assert [event["event_id"] for event in finding.evidence["events"]] == ["cheap"]
    assert finding.journey == "car-rental"


# --------------------------------------------------------------------------------------------
# stage_shortfall.


def window(events: int, mean_gap: float, shortfall_rate: float, revenue: float = 0.0) -> StageWindow:
    return StageWindow(events, mean_gap * events, round(shortfall_rate * events), revenue)


@pytest.mark.parametrize(
    ("figures", "breaches"),
    [
        (window(20, -1.5, 0.1), ["mean_gap"]),  # at the mean gap limit
        (window(20, -1.0, 0.4), ["shortfall_rate"]),  # at the shortfall rate limit
        (window(50, -3.0, 0.9), ["mean_gap", "shortfall_rate"]),
        (window(20, -1.4, 0.35), []),
        (window(19, -9.0, 1.0), []),  # too few events to say
        (StageWindow(), []),
    ],
)
def test_a_stage_fires_with_enough_events_and_a_limit_reached(figures, breaches):
    finding = stage_shortfall("car-rental", "pickup", figures, RULE, 1000.0, 60)
    assert finding.firing == bool(breaches)
    assert finding.evidence["breaches"] == breaches
    assert finding.subject == "car-rental/pickup" and finding.journey == "car-rental"


def test_stage_evidence_holds_the_window_figures_and_the_thresholds():
    figures = StageWindow(40, -120.0, 30, 12_000.0, ("e-40", "e-39"))
    finding = stage_shortfall("car-rental", "pickup", figures, RULE, 1000.0, 60)
    assert finding.evidence == {
        "window": "1h", "events": 40, "mean_gap": -3.0, "shortfall_rate": 0.75, "revenue": 12000.0,
        "mean_gap_below": -1.5, "shortfall_rate_above": 0.4, "min_events": 20,
        "breaches": ["mean_gap", "shortfall_rate"], "recovered": False, "last_event_ids": ["e-40", "e-39"],
    }  # fmt: skip
    assert finding.revenue_at_stake == 12_000.0 and finding.severity == "critical"


def test_a_stage_without_traffic_says_it_has_too_few_events():
    finding = stage_shortfall("car-rental", "pickup", StageWindow(3, -30.0, 3, 0.0), RULE, 1000.0, 60)
    assert not finding.firing and finding.recovered and "fewer than the 20" in finding.reason


@pytest.mark.parametrize(
    ("figures", "recovered"),
    [
        (window(40, -1.3, 0.2), False),  # mean gap within its limit (-1.5) but not by the margin
        (window(40, -1.2, 0.2), True),
        (window(40, 0.5, 0.375), False),  # shortfall rate below 0.4 but not by the margin
        (window(40, 0.5, 0.325), True),
        (window(10, -5.0, 1.0), True),  # too few events to say it fails
    ],
)
def test_a_stage_recovers_only_once_clear_of_its_limits_by_a_margin(figures, recovered):
    finding = stage_shortfall("car-rental", "pickup", figures, RULE, 1000.0, 60)
    assert not finding.firing
    assert finding.recovered == recovered == finding.evidence["recovered"]
    assert plan(finding, "open") == ("resolve" if recovered else "update")
    assert plan(finding, None) is None  # in between, no alert opens either


def test_the_subject_of_a_stage_alert_round_trips():
    assert alerting.parse_stage_subject(alerting.stage_subject("car-rental", "on-road-assistance")) == (
        "car-rental",
        "on-road-assistance",
    )


# --------------------------------------------------------------------------------------------
# What a finding does to the subject's alert.


def finding(kind: str, firing: bool, recovered: bool | None = None):
    recovered = not firing if recovered is None else recovered
    return alerting.Finding(kind, "s", "car-rental", firing, recovered, "low", 0.0, {}, "why")


@pytest.mark.parametrize("kind", alerting.KINDS)
def test_a_firing_rule_opens_an_alert_or_updates_the_unresolved_one(kind):
    assert plan(finding(kind, True), None) == "open"
    assert plan(finding(kind, True), "open") == "update"
    assert plan(finding(kind, True), "acknowledged") == "update"  # a person's acknowledgement stands


@pytest.mark.parametrize("kind", ["customer_at_risk", "stage_shortfall"])
def test_a_rule_that_stops_holding_resolves_its_alert(kind):
    assert plan(finding(kind, False), "open") == "resolve"
    assert plan(finding(kind, False), "acknowledged") == "resolve"
    assert plan(finding(kind, False), None) is None


def test_a_hot_alert_waits_for_a_person_to_resolve_it():
    assert plan(finding("customer_hot", False), "open") is None
    assert plan(finding("customer_hot", False, recovered=True), "acknowledged") is None


# --------------------------------------------------------------------------------------------
# What people may do.


def test_people_acknowledge_open_alerts_and_resolve_unresolved_ones():
    assert manual_transition("open", "acknowledge") == "acknowledged"
    assert manual_transition("open", "resolve") == "resolved"
    assert manual_transition("acknowledged", "resolve") == "resolved"


@pytest.mark.parametrize(
    ("status", "command", "why"),
    [
        ("resolved", "resolve", "already resolved"),
        ("resolved", "acknowledge", "resolved alert cannot be acknowledged"),
        ("acknowledged", "acknowledge", "already acknowledged"),
    ],
)
def test_illegal_transitions_say_why(status, command, why):
    with pytest.raises(IllegalTransition, match=why):
        manual_transition(status, command)


# --------------------------------------------------------------------------------------------
# Documents.


def test_a_transition_document_carries_the_alert_and_why():
    alert = SimpleNamespace(
        id="6f1c", kind="stage_shortfall", subject="car-rental/pickup", journey="car-rental", severity="high",
        status="resolved", opened_at=AT, updated_at=AT, acknowledged_at=None, resolved_at=AT,
        revenue_at_stake=3500.0, evidence={"events": 30}, acknowledged_by=None, resolved_by=None, note=None,
    )  # fmt: skip
    document = alerting.alert_document(alert)
    row = SimpleNamespace(
        seq=42, tenant="t", alert_id="6f1c", kind="stage_shortfall", subject="car-rental/pickup",
        from_status="open", to_status="resolved", at=AT,
        payload=alerting.transition_payload(document, "recovered"),
    )  # fmt: skip
    assert alerting.transition_document(row) == {
        "seq": 42, "tenant": "t", "alert_id": "6f1c", "kind": "stage_shortfall", "subject": "car-rental/pickup",
        "from": "open", "to": "resolved", "at": AT.isoformat(), "reason": "recovered", "by": None, "note": None,
        "alert": document,
    }  # fmt: skip
    assert document["opened_at"] == AT.isoformat() and document["acknowledged_at"] is None


def test_an_update_names_its_own_events_first_then_those_named_before():
    earlier = {"events": 21, "last_event_ids": ["e6", "e5", "e4", "e3", "e2", "e1"]}
    update = {"events": 25, "last_event_ids": ["e10", "e9", "e8", "e7", "e6"]}
    merged = alerting.with_earlier_event_ids(update, earlier)
    assert merged["last_event_ids"] == ["e10", "e9", "e8", "e7", "e6", "e5", "e4", "e3", "e2", "e1"]
    assert merged["events"] == 25 and update["last_event_ids"] == ["e10", "e9", "e8", "e7", "e6"]
    # At most MAX_EVIDENCE_EVENTS, the newest kept.
    many = alerting.with_earlier_event_ids({"last_event_ids": ["e12", "e11"]}, merged)
    assert many["last_event_ids"] == ["e12", "e11", *merged["last_event_ids"][:8]]
    # A re-evaluation without new events keeps the ids; with none anywhere, the evidence is as given.
    assert alerting.with_earlier_event_ids({"events": 0}, earlier)["last_event_ids"] == earlier["last_event_ids"]
    assert alerting.with_earlier_event_ids({"events": 0}, {"events": 3}) == {"events": 0}
    assert alerting.with_earlier_event_ids({"events": 0}, None) == {"events": 0}
