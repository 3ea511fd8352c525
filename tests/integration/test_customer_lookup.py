"""GET /v1/customers/{id} reads the customer, their stages and their open alerts in one statement
(a row per stage and open alert): each stage and each alert comes back once, in order, and the
alerts are the documents GET /v1/alerts/{id} shows."""

from __future__ import annotations

import math
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import insert

from services.core.db.engine import create_engine
from services.core.db.schema import alerts
from services.core.scoring import ScoredEvent
from tests.integration.test_api import JOURNEYS, NOW, NOW_S, api_settings, serve, write_aggregates

pytestmark = pytest.mark.integration


def alert_row(tenant: str, kind: str, subject: str, status: str, opened_minutes_ago: float, **extra) -> dict:
    opened = NOW - timedelta(minutes=opened_minutes_ago)
    return {
        "tenant": tenant, "id": uuid.uuid4(), "kind": kind, "subject": subject, "journey": "hotel",
        "severity": "high", "status": status, "opened_at": opened, "updated_at": opened,
        "acknowledged_at": opened if status == "acknowledged" else None,
        "resolved_at": opened if status == "resolved" else None, "revenue_at_stake": 1500.0,
        "evidence": {"why": kind, "figures": [1, 2.5]}, "acknowledged_by": None, "resolved_by": None, "note": None,
        **extra,
    }  # fmt: skip


async def test_one_customer_with_stages_and_open_alerts_lists_each_once_in_order(postgres):
    settings = api_settings(postgres)
    hotel = JOURNEYS["hotel"]
    stages = hotel.stages[:3]
    events = [
        ScoredEvent(f"e-{index}", "kim", "hotel", stage.id, "", "web", NOW_S - 600 * (index + 1), 4.0 + index, 7.0,
                    stage.promise, stage.weight, revenue=800.0)  # fmt: skip
        for index, stage in enumerate(reversed(stages))
    ]
    events.append(ScoredEvent("e-other", "lee", "hotel", stages[0].id, "", "web", NOW_S - 60, 9.0, 7.0,
                              stages[0].promise, stages[0].weight))  # fmt: skip
    await write_aggregates(settings, events)
    tenant = settings.tenant
    rows = [
        alert_row(tenant, "customer_hot", "kim", "acknowledged", 10),
        alert_row(tenant, "customer_at_risk", "kim", "open", 30, revenue_at_stake=math.inf),
        alert_row(tenant, "customer_at_risk", "kim", "resolved", 90),  # resolved: not listed
        alert_row(tenant, "customer_hot", "lee", "open", 5),  # another customer's
        alert_row(tenant, "stage_shortfall", "kim", "open", 20),  # not a customer alert
    ]
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(alerts), rows)
    finally:
        await engine.dispose()

    async with serve(settings) as client:
        response = await client.get("/v1/customers/kim")
        assert response.status_code == 200, response.text
        body = response.json()
        # Journey-map order, each stage once although each row of it met two alerts.
        assert [row["stage"] for row in body["stages"]] == [stage.id for stage in stages]
        assert [row["events"] for row in body["stages"]] == [1, 1, 1]
        # Oldest first, each once although it met three stage rows.
        assert [alert["kind"] for alert in body["open_alerts"]] == ["customer_at_risk", "customer_hot"]
        assert body["open_alerts"][0]["revenue_at_stake"] is None  # not finite: null, as the alerts resource says
        for alert in body["open_alerts"]:
            assert alert == (await client.get(f"/v1/alerts/{alert['id']}")).json()
        assert (await client.get("/v1/customers/lee")).json()["open_alerts"][0]["subject"] == "lee"
        assert (await client.get("/v1/customers/nobody")).status_code == 404
