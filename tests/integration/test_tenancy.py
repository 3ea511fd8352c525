"""Tenant isolation through the whole stack: two tenants' keys, one ingest, one scoring consumer,
one API. Tenant A cannot read, change or infer anything of tenant B's, even under the same
customer ids or by guessing B's ids: what is B's looks exactly like what never existed.
And no customer id or key shows up in any log line of the three services while they work."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from services.api.app import create_app as create_api
from services.core.db.api_keys import create_key
from services.core.db.engine import create_engine
from services.ingest.app import create_app as create_ingest
from services.scoring.app import create_app as create_scoring
from tests.conftest import make_settings
from tests.e2e.test_pipeline import running, wait_until
from tests.integration.test_alerts import SseClient, serve

pytestmark = pytest.mark.integration

# Distinctive, so that a log line holding one cannot be a coincidence.
SHARED = "cust-Shared-7f3a"  # the same customer id in both tenants
ONLY_A = "cust-OnlyA-91bc"
ONLY_B = "cust-OnlyB-44de"
VIP_B = "cust-VipB-0c21"  # raises B's alerts


def event(event_id: str, customer_id: str, stage: str, experience: float, revenue: float = 0.0, minutes_ago=2.0):
    return {
        "event_id": event_id,
        "occurred_at": (datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)).isoformat(),
        "customer_id": customer_id,
        "journey": "car-rental",
        "stage": stage,
        "touchpoint": "counter" if stage == "pickup" else None,
        "channel": "in_person",
        "experience": experience,
        "revenue": revenue,
    }


def without(body: dict, *texts: str) -> str:
    """The body with the ids it names blanked: two 404s must differ in nothing else."""
    rendered = repr(body)
    for text in texts:
        rendered = rendered.replace(text, "<id>")
    return rendered


@pytest.fixture(scope="module")
async def tenants(postgres, kafka):
    settings = make_settings(postgres, kafka, auth_disabled=False, alert_stream_poll_s=0.1)
    tenant_a, tenant_b = f"{settings.tenant}-a", f"{settings.tenant}-b"
    engine = create_engine(settings.database_url)
    try:
        _, key_a = await create_key(engine, tenant_a, "a", ["admin"])
        _, key_b = await create_key(engine, tenant_b, "b", ["admin"])
    finally:
        await engine.dispose()
    yield settings, (tenant_a, key_a), (tenant_b, key_b)


@pytest.fixture(scope="module")
async def world(tenants):
    """Both tenants' events scored: A's three customers, B's three, B's alerts open."""
    settings, (tenant_a, key_a), (tenant_b, key_b) = tenants
    a, b = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}
    events_a = [
        event("a-1", SHARED, "pickup", 9),
        event("a-2", SHARED, "reservation", 8),
        event("a-3", ONLY_A, "pickup", 7),
    ]
    # B reuses A's event ids: idempotency keys are per tenant, so nothing of B's is dropped.
    events_b = [
        event("a-1", SHARED, "pickup", 2, revenue=50),
        event("a-2", ONLY_B, "pickup", 3),
        event("b-3", ONLY_B, "return", 4),
        event("b-4", VIP_B, "pickup", 0, revenue=5000),  # gap <= -5 at high revenue: hot and at risk
    ]
    async with AsyncExitStack() as exits:
        await exits.enter_async_context(running(create_scoring(settings)))
        ingest = await exits.enter_async_context(running(create_ingest(settings)))
        api_url = await exits.enter_async_context(serve(create_api(settings)))
        api = await exits.enter_async_context(httpx.AsyncClient(base_url=api_url, timeout=10))

        async def ready():
            return (await ingest.get("/readyz")).status_code == 200

        await wait_until(ready)
        for events, headers in ((events_a, a), (events_b, b)):
            response = await ingest.post("/v1/events:batch", json={"events": events}, headers=headers)
            assert response.status_code == 202 and response.json()["accepted"] == len(events), response.text

        async def scored():
            for customer, headers in ((ONLY_A, a), (ONLY_B, b), (VIP_B, b)):
                if (await api.get(f"/v1/customers/{customer}", headers=headers)).status_code != 200:
                    return False
            alerts = (await api.get("/v1/alerts", headers=b)).json()["items"]
            return {alert["kind"] for alert in alerts} >= {"customer_hot", "customer_at_risk"}

        await wait_until(scored)
        yield api, ingest, a, b, events_a, events_b


async def test_a_tenant_reads_only_its_own_customers_even_under_the_same_ids(world):
    api, _, a, b, events_a, events_b = world
    shared_a = (await api.get(f"/v1/customers/{SHARED}", headers=a)).json()
    shared_b = (await api.get(f"/v1/customers/{SHARED}", headers=b)).json()
    assert shared_a["event_count"] == 2 and shared_b["event_count"] == 1
    assert shared_a["experience_index"] > 0 > shared_b["experience_index"]
    assert {stage["stage"] for stage in shared_a["stages"]} == {"pickup", "reservation"}
    assert shared_a["open_alerts"] == []

    listed_a = {item["customer_id"] for item in (await api.get("/v1/customers", headers=a)).json()["items"]}
    listed_b = {item["customer_id"] for item in (await api.get("/v1/customers", headers=b)).json()["items"]}
    assert listed_a == {SHARED, ONLY_A} and listed_b == {SHARED, ONLY_B, VIP_B}
    at_risk_a = (await api.get("/v1/customers", params={"quadrant": "at_risk"}, headers=a)).json()["items"]
    assert at_risk_a == []


async def test_another_tenants_customer_is_a_404_identical_to_one_never_seen(world):
    api, _, a, _, _, _ = world
    theirs = await api.get(f"/v1/customers/{ONLY_B}", headers=a)
    never = await api.get("/v1/customers/cust-Never-0000", headers=a)
    assert theirs.status_code == never.status_code == 404
    assert without(theirs.json(), ONLY_B) == without(never.json(), "cust-Never-0000")
    assert set(theirs.headers) == set(never.headers)


async def test_stage_figures_and_the_positioning_map_count_only_the_tenants_events(world):
    api, _, a, b, events_a, events_b = world
    for headers, events in ((a, events_a), (b, events_b)):
        stages = (await api.get("/v1/journeys/car-rental/stages", params={"window": "1h"}, headers=headers)).json()
        counts = {row["stage"]: row["events"] for row in stages["stages"] if row["events"]}
        expected: dict[str, int] = {}
        for item in events:
            expected[item["stage"]] = expected.get(item["stage"], 0) + 1
        assert counts == expected
        touchpoints = (await api.get("/v1/journeys/car-rental/stages/pickup/touchpoints", headers=headers)).json()
        assert sum(row["events"] for row in touchpoints["touchpoints"]) == expected["pickup"]
        series = (await api.get("/v1/journeys/car-rental/stages/pickup/series", params={"window": "1h"},
                                headers=headers)).json()  # fmt: skip
        assert sum(point["events"] for point in series["points"]) == expected["pickup"]
        revenue = sum(item["revenue"] for item in events)
        positioning = (await api.get("/v1/positioning-map", headers=headers)).json()
        customers = {item["customer_id"] for item in events}
        assert sum(row["customers"] for row in positioning["quadrants"]) == len(customers)
        assert sum(row["revenue"] for row in positioning["quadrants"]) == pytest.approx(revenue, rel=1e-3)


async def test_another_tenants_alerts_cannot_be_seen_guessed_or_changed(world):
    api, _, a, b, _, _ = world
    alerts_b = (await api.get("/v1/alerts", headers=b)).json()["items"]
    assert alerts_b and (await api.get("/v1/alerts", headers=a)).json()["items"] == []
    assert (await api.get("/v1/alerts", params={"subject": VIP_B}, headers=a)).json()["items"] == []
    random_id = str(uuid.uuid4())
    for alert in alerts_b:
        for method, path, body in (
            ("GET", "/v1/alerts/{}", None),
            ("POST", "/v1/alerts/{}/acknowledge", {"by": "intruder"}),
            ("POST", "/v1/alerts/{}/resolve", {"by": "intruder"}),
        ):
            theirs = await api.request(method, path.format(alert["id"]), json=body, headers=a)
            never = await api.request(method, path.format(random_id), json=body, headers=a)
            assert theirs.status_code == never.status_code == 404, theirs.text
            assert without(theirs.json(), alert["id"]) == without(never.json(), random_id)
    after = {alert["id"]: alert["status"] for alert in (await api.get("/v1/alerts", headers=b)).json()["items"]}
    assert after == {alert["id"]: alert["status"] for alert in alerts_b}  # untouched
    assert set(after.values()) == {"open"}


async def test_the_alert_stream_carries_only_the_tenants_transitions(world, tenants):
    api, _, a, b, _, _ = world
    tenant_b = tenants[2][0]
    streams = {name: SseClient().start(api, "/v1/alerts/stream?last_event_id=0", headers=headers)
               for name, headers in (("a", a), ("b", b))}  # fmt: skip
    try:
        await asyncio.wait_for(asyncio.gather(*(stream.connected.wait() for stream in streams.values())), 10)
        await wait_until(lambda: asyncio.sleep(0, result=len(streams["b"].events) >= 2), timeout_s=10)
        await asyncio.sleep(0.5)  # A's stream had as long to see anything
    finally:
        for stream in streams.values():
            await stream.stop()
    assert streams["a"].events == []
    assert {item.data["tenant"] for item in streams["b"].events} == {tenant_b}
    assert all(item.data["subject"] != SHARED for item in streams["b"].events)


async def test_the_body_cannot_choose_the_tenant(world):
    _, ingest, a, _, _, _ = world
    sneaky = {**event("a-9", ONLY_B, "pickup", 5), "tenant": "someone-else"}
    response = await ingest.post("/v1/events", json=sneaky, headers=a)
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "tenant"
    batch = await ingest.post("/v1/events:batch", json={"events": [event("a-9", ONLY_A, "pickup", 5)],
                                                        "tenant": "someone-else"}, headers=a)  # fmt: skip
    assert batch.status_code == 422 and batch.json()["detail"][0]["field"] == "tenant"


async def test_no_customer_id_or_key_is_written_to_the_logs(postgres, kafka, caplog):
    """The services at work (events in, scoring, reads, refusals), every log record checked."""
    settings = make_settings(postgres, kafka, auth_disabled=False)
    engine = create_engine(settings.database_url)
    try:
        _, key_a = await create_key(engine, settings.tenant, "logs", ["admin"])
    finally:
        await engine.dispose()
    caplog.set_level(logging.DEBUG, logger="cem")
    caplog.set_level(logging.DEBUG, logger="services")
    caplog.set_level(logging.INFO)
    a = {"Authorization": f"Bearer {key_a}"}
    secret_customer = "cust-LogCheck-5e5e"
    async with AsyncExitStack() as exits:
        await exits.enter_async_context(running(create_scoring(settings)))
        ingest = await exits.enter_async_context(running(create_ingest(settings)))
        api = await exits.enter_async_context(running(create_api(settings)))

        async def ready():
            return (await ingest.get("/readyz")).status_code == 200

        await wait_until(ready)
        good = event("log-1", secret_customer, "pickup", 1, revenue=3000)
        assert (await ingest.post("/v1/events", json=good, headers=a)).status_code == 202
        bad = {**event("log-2", secret_customer, "pikcup", 1)}
        assert (await ingest.post("/v1/events", json=bad, headers=a)).status_code == 422
        wrong = key_a[:-1] + ("x" if key_a[-1] != "x" else "y")  # the right prefix, a wrong secret
        refused = await ingest.post("/v1/events", json=good, headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 401

        async def scored():
            return (await api.get(f"/v1/customers/{secret_customer}", headers=a)).status_code == 200

        await wait_until(scored)
        await api.get("/v1/alerts", params={"subject": secret_customer}, headers=a)
    # The services' records; httpx's are this test's own client naming the URLs it calls.
    logged = [record.getMessage() for record in caplog.records if not record.name.startswith("httpx")]
    assert logged, "the services logged nothing: the check would prove nothing"
    leaks = [line for line in logged if secret_customer in line or key_a.split("_")[2][:12] in line]
    assert leaks == []
