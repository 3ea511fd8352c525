"""Revenue decays between events: the sweep moves customers out of the high-revenue quadrants
and their at-risk alert resolves, without any new event."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from services.core.db.engine import create_engine
from services.core.journeys import JourneyCatalog, JourneyVersion, load_journeys
from services.core.scoring import HalfLives, ScoredEvent
from services.scoring.alerts import AlertEvaluator
from services.scoring.store import ScoringContext, TenantEvent, score_batch
from services.scoring.sweep import demote_decayed_customers

pytestmark = pytest.mark.integration


def event(customer_id: str, occurred: datetime, experience: float, revenue: float) -> ScoredEvent:
    return ScoredEvent(
        event_id=f"{customer_id}-1", customer_id=customer_id, journey="car-rental", stage="pickup",
        touchpoint="", channel="", occurred_s=occurred.timestamp(), experience=experience, expectation=8.0,
        promise=8.0, weight=1.0, revenue=revenue,
    )  # fmt: skip


async def test_decayed_revenue_moves_customers_down_and_resolves_their_at_risk_alert(settings):
    journeys = load_journeys(settings.journeys_dir)
    threshold = journeys["car-rental"].revenue_threshold
    context = ScoringContext(
        group_id=settings.scoring_group_id,
        half_lives=HalfLives(settings.customer_half_life_s, settings.trend_half_life_s, settings.revenue_half_life_s),
        journeys=JourneyCatalog(journeys),
    )
    evaluator = AlertEvaluator(context)
    now = datetime.now(timezone.utc)
    twenty_days_ago = now - timedelta(days=20)  # revenue x 2**(-20/90) = 0.857 by now
    events = [
        event("fading-risk", twenty_days_ago, 3.0, threshold * 1.05),  # at_risk then, disengaged now
        event("fading-star", twenty_days_ago, 9.5, threshold * 1.05),  # exemplary then, growth now
        event("still-risk", twenty_days_ago, 3.0, threshold * 3.0),  # stays at_risk
    ]
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            outcome = await score_batch(
                conn, [TenantEvent(settings.tenant, item, now.timestamp()) for item in events], [], context,
                twenty_days_ago,
            )  # fmt: skip
            await evaluator(conn, outcome)
        assert outcome.quadrants[(settings.tenant, "fading-risk")] == "at_risk"

        moved = await demote_decayed_customers(engine, context, evaluator, now=now)
        assert moved >= 2
        async with engine.connect() as conn:
            quadrants = dict(
                (await conn.execute(
                    text("SELECT customer_id, quadrant FROM customers WHERE tenant = :t"), {"t": settings.tenant}
                )).all()
            )  # fmt: skip
            alerts = dict(
                (await conn.execute(
                    text("SELECT subject, status FROM alerts WHERE tenant = :t AND kind = 'customer_at_risk'"),
                    {"t": settings.tenant},
                )).all()
            )  # fmt: skip
        assert quadrants == {"fading-risk": "disengaged", "fading-star": "growth", "still-risk": "at_risk"}
        assert alerts == {"fading-risk": "resolved", "still-risk": "open"}
        # A second sweep finds nothing more to do.
        assert await demote_decayed_customers(engine, context, evaluator, now=now) == 0
    finally:
        await engine.dispose()


async def test_the_sweep_judges_each_tenant_by_its_own_thresholds(settings):
    """A tenant that raised car-rental's revenue threshold after its customers were placed: the
    sweep moves its customers by the new threshold and leaves another tenant's alone."""
    journeys = load_journeys(settings.journeys_dir)
    shipped = journeys["car-rental"]
    catalog = JourneyCatalog(journeys)
    context = ScoringContext(
        group_id=settings.scoring_group_id,
        half_lives=HalfLives(settings.customer_half_life_s, settings.trend_half_life_s, settings.revenue_half_life_s),
        journeys=catalog,
    )
    own, other = f"{settings.tenant}-own", f"{settings.tenant}-other"
    now = datetime.now(timezone.utc)
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            batch = [TenantEvent(tenant, event("rich", now, 3.0, shipped.revenue_threshold * 3), now.timestamp())
                     for tenant in (own, other)]  # fmt: skip
            outcome = await score_batch(conn, batch, [], context, now)
        assert {outcome.quadrants[(tenant, "rich")] for tenant in (own, other)} == {"at_risk"}

        raised = replace(shipped, revenue_threshold=shipped.revenue_threshold * 5)
        catalog.replace([JourneyVersion(own, "car-rental", 1, raised)])
        assert await demote_decayed_customers(engine, context, None, now=now) == 1
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT tenant, quadrant FROM customers WHERE tenant = ANY(:t) AND customer_id = 'rich'"),
                {"t": [own, other]},
            )
            assert dict(rows.all()) == {own: "disengaged", other: "at_risk"}
    finally:
        await engine.dispose()
