"""Alert evaluation in the scoring transaction (SPEC 7): the batch's figures in, alert changes out.

`AlertEvaluator` is the Scorer's `after_batch`: it runs inside the batch's transaction, after the
aggregates are updated, so an alert opens or resolves exactly when (and only if) the figures that
justify it commit. The rules are `services.core.alerting` (pure); this module gathers the figures
and applies the decisions with a few set-based statements per tenant:

1. the stage windows of the (journey, stage) pairs the batch touched (one aggregate query);
2. the unresolved alerts of every subject a rule spoke about, locked in (kind, subject) order;
3. one INSERT for the alerts to open, one UPDATE for those to update or resolve;
4. the transitions, appended to alert_transitions (services.core.db.alerts).

`reevaluate_stage_alerts` re-judges the unresolved stage alerts on a timer, so that they resolve
when traffic stops (no batch touches the stage any more).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from sqlalchemy import ARRAY, Text, bindparam, func, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.core import alerting
from services.core.alerting import Finding, HotEvent, StageWindow
from services.core.bucket_windows import Window
from services.core.db.alerts import ALERT_COLUMNS, NewTransition, dumps, record_transitions
from services.core.db.stage_windows import has_events, signed_sum, window_rows
from services.core.journeys import Journey, JourneyCatalog
from services.core.scoring import from_epoch_seconds
from services.scoring.store import BatchOutcome, ScoringContext

log = logging.getLogger("cem.scoring.alerts")


async def load_stage_windows(
    conn: AsyncConnection, tenant: str, keys: list[tuple[str, str]], window: Window
) -> dict[tuple[str, str], StageWindow]:
    if not keys:
        return {}
    # The pairs as two arrays: one statement text, and one plan, whatever their number.
    pairs = func.unnest(
        bindparam("journeys", [key[0] for key in keys], type_=ARRAY(Text)),
        bindparam("stages", [key[1] for key in keys], type_=ARRAY(Text)),
    ).table_valued("journey", "stage").render_derived(name="pairs")
    rows = window_rows(
        window.ranges(),
        ("journey", "stage", "events", "gap_sum", "shortfall_events", "revenue_sum"),
        lambda table: [
            table.tenant == tenant,
            tuple_(table.journey, table.stage).in_(select(pairs.c.journey, pairs.c.stage)),
        ],
    )
    query = select(
        rows.c.journey,
        rows.c.stage,
        signed_sum(rows.c, "events").label("events"),
        signed_sum(rows.c, "gap_sum").label("gap_sum"),
        signed_sum(rows.c, "shortfall_events").label("shortfall_events"),
        signed_sum(rows.c, "revenue_sum").label("revenue"),
    ).group_by(rows.c.journey, rows.c.stage).having(has_events(rows.c))
    return {
        (row.journey, row.stage): StageWindow(
            events=int(row.events), gap_sum=row.gap_sum, shortfall_events=int(row.shortfall_events), revenue=row.revenue
        )
        for row in await conn.execute(query)
    }


def stage_findings(
    journeys: dict[str, Journey],
    keys: list[tuple[str, str]],
    windows: dict[tuple[str, str], StageWindow],
    window_minutes: int,
    last_event_ids: dict[tuple[str, str], list[str]] | None = None,
) -> list[Finding]:
    findings = []
    for journey_id, stage_id in keys:
        journey = journeys.get(journey_id)
        stage = journey.stage(stage_id) if journey else None
        if stage is None:
            continue  # no longer in the maps: no rule to judge it by
        window = windows.get((journey_id, stage_id), StageWindow())
        ids = (last_event_ids or {}).get((journey_id, stage_id))
        if ids:
            window = replace(window, last_event_ids=tuple(reversed(ids)))  # the latest first
        threshold = journey.revenue_threshold
        findings.append(alerting.stage_shortfall(journey_id, stage_id, window, stage.alert, threshold, window_minutes))
    return findings


_LOCK_UNRESOLVED = text(
    "SELECT a.id, a.kind, a.subject, a.status, a.evidence FROM alerts a "
    "JOIN unnest(CAST(:kinds AS text[]), CAST(:subjects AS text[])) AS k(kind, subject) "
    "ON a.kind = k.kind AND a.subject = k.subject "
    "WHERE a.tenant = :tenant AND a.status <> 'resolved' ORDER BY a.kind, a.subject FOR UPDATE OF a"
)

_OPEN = text(
    "INSERT INTO alerts (tenant, id, kind, subject, journey, severity, status, opened_at, updated_at, "
    "revenue_at_stake, evidence) "
    "SELECT :tenant, id, kind, subject, journey, severity, 'open', :now, :now, revenue, evidence FROM unnest("
    "CAST(:ids AS uuid[]), CAST(:kinds AS text[]), CAST(:subjects AS text[]), CAST(:journeys AS text[]), "
    "CAST(:severities AS text[]), CAST(:revenues AS double precision[]), CAST(:evidence AS jsonb[])) "
    "AS u(id, kind, subject, journey, severity, revenue, evidence) ORDER BY kind, subject "
    # Another scoring replica opened the same alert a moment ago: theirs stands.
    "ON CONFLICT (tenant, kind, subject) WHERE status <> 'resolved' DO NOTHING "
    f"RETURNING {ALERT_COLUMNS}"
)

# Updates keep the status and take the new figures; resolutions keep the figures that opened (or
# last updated) the alert and add those that resolved it.
_CHANGE = text(
    "UPDATE alerts a SET status = u.status, updated_at = :now, "
    "resolved_at = CASE WHEN u.status = 'resolved' THEN :now ELSE a.resolved_at END, "
    "severity = CASE WHEN u.status = 'resolved' THEN a.severity ELSE u.severity END, "
    "revenue_at_stake = CASE WHEN u.status = 'resolved' THEN a.revenue_at_stake ELSE u.revenue END, "
    "evidence = CASE WHEN u.status = 'resolved' THEN a.evidence || jsonb_build_object('resolution', u.evidence) "
    "ELSE u.evidence END "
    "FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS text[]), CAST(:severities AS text[]), "
    "CAST(:revenues AS double precision[]), CAST(:evidence AS jsonb[])) AS u(id, status, severity, revenue, evidence) "
    f"WHERE a.tenant = :tenant AND a.id = u.id RETURNING {', '.join('a.' + c for c in ALERT_COLUMNS.split(', '))}"
)


async def apply_findings(
    conn: AsyncConnection, tenant: str, findings: list[Finding], now: datetime
) -> list[NewTransition]:
    """Open, update or resolve the tenant's alerts as the findings say; the transitions to record.

    The caller records them (record_transitions) once, after every tenant's alerts: the log's lock
    is taken after all row locks, never between them, so writers cannot deadlock.
    """
    by_key = {finding.key: finding for finding in findings}
    if not by_key:
        return []
    keys = sorted(by_key)
    current = {
        (row.kind, row.subject): row
        for row in await conn.execute(
            _LOCK_UNRESOLVED, {"tenant": tenant, "kinds": [k[0] for k in keys], "subjects": [k[1] for k in keys]}
        )
    }
    to_open: list[Finding] = []
    to_change: list[tuple[Finding, object, str]] = []  # finding, current row, new status
    for key in keys:
        finding, row = by_key[key], current.get(key)
        action = alerting.plan(finding, row.status if row else None)
        if action == "open":
            to_open.append(finding)
        elif action == "update":
            evidence = alerting.with_earlier_event_ids(finding.evidence, row.evidence)
            to_change.append((replace(finding, evidence=evidence), row, row.status))
        elif action == "resolve":
            to_change.append((finding, row, "resolved"))

    transitions: list[NewTransition] = []
    if to_open:
        opened = await conn.execute(
            _OPEN,
            {
                "tenant": tenant,
                "now": now,
                "ids": [uuid.uuid4() for _ in to_open],
                "kinds": [f.kind for f in to_open],
                "subjects": [f.subject for f in to_open],
                "journeys": [f.journey for f in to_open],
                "severities": [f.severity for f in to_open],
                "revenues": [f.revenue_at_stake for f in to_open],
                "evidence": [dumps(f.evidence) for f in to_open],
            },
        )
        for row in opened:
            finding = by_key[(row.kind, row.subject)]
            transitions.append(_transition(tenant, row, None, now, finding.reason))
    if to_change:
        changed = await conn.execute(
            _CHANGE,
            {
                "tenant": tenant,
                "now": now,
                "ids": [row.id for _, row, _ in to_change],
                "statuses": [status for _, _, status in to_change],
                "severities": [f.severity for f, _, _ in to_change],
                "revenues": [f.revenue_at_stake for f, _, _ in to_change],
                "evidence": [dumps(f.evidence) for f, _, _ in to_change],
            },
        )
        previous = {row.id: row.status for _, row, _ in to_change}
        for row in changed:
            if row.status == "resolved":
                finding = by_key[(row.kind, row.subject)]
                transitions.append(_transition(tenant, row, previous[row.id], now, finding.reason))
    return transitions


def _transition(tenant: str, row, from_status: str | None, now: datetime, reason: str) -> NewTransition:
    return NewTransition(
        tenant=tenant,
        alert_id=row.id,
        kind=row.kind,
        subject=row.subject,
        from_status=from_status,
        to_status=row.status,
        at=now,
        payload=alerting.transition_payload(alerting.alert_document(row), reason),
    )


class AlertEvaluator:
    """The Scorer's after_batch: judges the batch's customers, hot events and stages."""

    def __init__(self, context: ScoringContext, window_minutes: int = 60):
        self.context = context
        self.window_minutes = window_minutes

    async def __call__(self, conn: AsyncConnection, outcome: BatchOutcome) -> None:
        now = outcome.now or datetime.now(timezone.utc)
        tenants = sorted({tenant for tenant, _ in outcome.customers} | {item.tenant for item in outcome.scored})
        transitions: list[NewTransition] = []
        for tenant in tenants:
            findings = self.customer_findings(tenant, outcome, now)
            keys, last_ids = self.touched_stages(tenant, outcome)
            windows = await load_stage_windows(
                conn, tenant, keys, Window.ending_at(now, timedelta(minutes=self.window_minutes))
            )
            findings += stage_findings(self.context.journeys.of(tenant), keys, windows, self.window_minutes, last_ids)
            transitions += await apply_findings(conn, tenant, findings, now)
        await record_transitions(conn, transitions)

    def customer_findings(self, tenant: str, outcome: BatchOutcome, now: datetime) -> list[Finding]:
        journeys, now_s = self.context.journeys.of(tenant), now.timestamp()
        revenue_half_life_s = self.context.half_lives.revenue_s
        left_at_risk = {
            change.customer_id
            for change in outcome.quadrant_changes
            if change.tenant == tenant and change.previous == "at_risk"
        }
        hot_events: dict[str, list[HotEvent]] = defaultdict(list)
        for item in outcome.scored:
            event = item.event
            journey = journeys.get(event.journey)
            if item.tenant == tenant and event.gap <= alerting.HOT_GAP and journey is not None:
                hot_events[event.customer_id].append(
                    HotEvent(
                        event_id=event.event_id,
                        journey=event.journey,
                        stage=event.stage,
                        touchpoint=event.touchpoint,
                        channel=event.channel,
                        gap=event.gap,
                        occurred_at=from_epoch_seconds(event.occurred_s),
                        revenue_threshold=journey.revenue_threshold,
                    )
                )
        findings = []
        for (state_tenant, customer_id), state in sorted(outcome.customers.items()):
            if state_tenant != tenant:
                continue
            quadrant = outcome.quadrants.get((tenant, customer_id))
            journey = journeys.get(state.latest_journey)
            revenue = state.revenue_at(now_s, revenue_half_life_s)
            # Every at-risk customer of the batch (opens, or refreshes the figures), and those who
            # just left at_risk (resolves). Others have no unresolved customer_at_risk alert.
            if journey is not None and (quadrant == "at_risk" or customer_id in left_at_risk):
                findings.append(
                    alerting.customer_at_risk(
                        customer_id, journey.id, quadrant, state.experience_index, revenue,
                        journey.experience_threshold, journey.revenue_threshold, state.events, state.latest_event_id,
                    )  # fmt: skip
                )
            if customer_id in hot_events:
                hot = alerting.customer_hot(customer_id, revenue, hot_events[customer_id])
                if hot is not None:
                    findings.append(hot)
        return findings

    @staticmethod
    def touched_stages(tenant: str, outcome: BatchOutcome) -> tuple[list[tuple[str, str]], dict]:
        last_ids: dict[tuple[str, str], list[str]] = defaultdict(list)
        latest = sorted(
            (item.event for item in outcome.scored if item.tenant == tenant), key=lambda e: (e.occurred_s, e.event_id)
        )
        for event in latest:
            ids = last_ids[(event.journey, event.stage)]
            ids.append(event.event_id)
            if len(ids) > alerting.MAX_EVIDENCE_EVENTS:
                del ids[0]
        return sorted(last_ids), last_ids


# --------------------------------------------------------------------------------------------
# The timer: unresolved stage alerts are re-judged even when no event arrives.


async def reevaluate_stage_alerts(
    engine: AsyncEngine,
    journeys: JourneyCatalog,
    window_minutes: int,
    now: datetime | None = None,
    tenant: str | None = None,
) -> list[NewTransition]:
    """Re-judge every unresolved stage alert (of one tenant, or all) at `now`; the transitions made."""
    now = now or datetime.now(timezone.utc)
    transitions: list[NewTransition] = []
    async with engine.begin() as conn:
        rows = await conn.execute(
            text(
                "SELECT tenant, subject FROM alerts WHERE kind = 'stage_shortfall' AND status <> 'resolved' "
                "AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant) ORDER BY tenant, subject"
            ),
            {"tenant": tenant},
        )
        by_tenant: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for row in rows:
            by_tenant[row.tenant].append(alerting.parse_stage_subject(row.subject))
        for owner, keys in by_tenant.items():
            window = Window.ending_at(now, timedelta(minutes=window_minutes))
            windows = await load_stage_windows(conn, owner, keys, window)
            findings = stage_findings(journeys.of(owner), keys, windows, window_minutes)
            transitions += await apply_findings(conn, owner, findings, now)
        await record_transitions(conn, transitions)
    return transitions


async def keep_stage_alerts_fresh(
    engine: AsyncEngine, context: ScoringContext, window_minutes: int, interval_s: float
) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await reevaluate_stage_alerts(engine, context.journeys, window_minutes)
        except Exception as error:  # the database may be down: the consumer reports it; retry later
            log.warning("stage alert re-evaluation failed: %s", error)
