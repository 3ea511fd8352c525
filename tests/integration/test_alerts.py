"""Closed-loop alerts (SPEC 7) against the real broker and Postgres, with scoring and the API running
in-process: scored events open and resolve alerts, people acknowledge and resolve them, and every
transition reaches the Server-Sent Events stream, the Kafka topic and the webhook, in order.

The tests of this module share one tenant and one running stack (module fixture `stack`); each
test uses its own customers and stages. An SSE client and a webhook receiver are connected before
the first test, and the last tests check that they saw every transition the others made.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import httpx
import orjson
import pytest
import uvicorn
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.api.app import create_app as create_api
from services.core.db.engine import create_engine
from services.core.embedded import free_port
from services.core.events import TouchpointRecord
from services.core.journeys import JourneyCatalog, load_journeys
from services.core.kafka import ensure_topics
from services.core.settings import DEFAULT_JOURNEYS_DIR
from services.scoring.alerts import reevaluate_stage_alerts
from services.scoring.app import create_app as create_scoring
from services.scoring.gauges import refresh_gauges
from tests.integration.test_scoring import produce
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

JOURNEYS = load_journeys(DEFAULT_JOURNEYS_DIR)
CAR = JOURNEYS["car-rental"]  # revenue threshold 1000, experience threshold 0
WEBHOOK_SECRET = "s3cret"


# --------------------------------------------------------------------------------------------
# The stack: scoring (lifespan in-process), the API and a webhook receiver on loopback ports.


@asynccontextmanager
async def serve(app):
    """An ASGI app under uvicorn on a free loopback port (streaming needs a real server)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def webhook_receiver(received: list[tuple[dict, bytes]]) -> Starlette:
    async def hook(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@dataclass
class SseEvent:
    id: int
    event: str
    data: dict


@dataclass
class SseClient:
    """Reads an SSE stream in the background; keeps the events and counts the comments."""

    events: list[SseEvent] = field(default_factory=list)
    comments: int = 0
    task: asyncio.Task | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, client: httpx.AsyncClient, url: str, headers: dict | None = None) -> None:
        async with client.stream("GET", url, headers=headers or {}) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            self.connected.set()
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    self.comments += 1
                elif line == "":
                    if "data" in fields:
                        self.events.append(SseEvent(int(fields["id"]), fields["event"], json.loads(fields["data"])))
                    fields = {}
                else:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")

    def start(self, client: httpx.AsyncClient, url: str, headers: dict | None = None) -> SseClient:
        self.task = asyncio.create_task(self.run(client, url, headers))
        return self

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@dataclass
class Stack:
    settings: object
    api: httpx.AsyncClient
    engine: object
    webhook: list[tuple[dict, bytes]]
    stream: SseClient
    counted_before: dict[tuple[str, str], float]


def transition_counts() -> dict[tuple[str, str], float]:
    counts = {}
    for metric in REGISTRY.collect():
        if metric.name == "cem_alert_transitions":
            for sample in metric.samples:
                if sample.name == "cem_alert_transitions_total":
                    counts[(sample.labels["kind"], sample.labels["to"])] = sample.value
    return counts


@pytest.fixture(scope="module")
async def stack(postgres, kafka):
    received: list[tuple[dict, bytes]] = []
    async with AsyncExitStack() as exits:
        hook_url = await exits.enter_async_context(serve(webhook_receiver(received)))
        settings = make_settings(
            postgres,
            kafka,
            alert_webhook_url=f"{hook_url}/hook",
            alert_webhook_secret=WEBHOOK_SECRET,
            alert_relay_interval_s=0.1,
            alert_stream_poll_s=0.1,
            alert_stream_ping_s=0.5,
            # The timer judges every tenant's stage alerts; the test calls it for its own tenant.
            alert_reevaluate_interval_s=3600,
            # A stage alert names the latest events of the batches that judged it; with one consumer,
            # the events a test posts at once are one batch, so it knows which those are.
            scoring_consumers=1,
        )
        await ensure_topics(settings)
        engine = create_engine(settings.database_url)
        exits.push_async_callback(engine.dispose)
        scoring = create_scoring(settings)
        await exits.enter_async_context(scoring.router.lifespan_context(scoring))
        api_url = await exits.enter_async_context(serve(create_api(settings)))
        api = await exits.enter_async_context(httpx.AsyncClient(base_url=api_url, timeout=10))
        stream = SseClient().start(api, "/v1/alerts/stream")
        exits.push_async_callback(stream.stop)
        await asyncio.wait_for(stream.connected.wait(), 10)
        yield Stack(settings, api, engine, received, stream, transition_counts())


# --------------------------------------------------------------------------------------------
# Events in, and waiting for them to be scored.


def touch(
    tenant: str,
    customer_id: str,
    stage: str,
    experience: float,
    revenue: float = 0.0,
    minutes_ago: float = 1.0,
    journey=CAR,
) -> TouchpointRecord:
    """One event whose gap is experience - the stage's promise."""
    promise = journey.stage(stage).promise
    now = datetime.now(timezone.utc)
    return TouchpointRecord(
        tenant=tenant,
        event_id=f"ev-{uuid.uuid4().hex[:16]}",
        occurred_at=now - timedelta(minutes=minutes_ago),
        received_at=now,
        customer_id=customer_id,
        journey=journey.id,
        stage=stage,
        channel="app",
        experience=experience,
        expectation=promise,
        promise=promise,
        weight=journey.stage(stage).weight,
        revenue=revenue,
    )


async def score(stack: Stack, records: list[TouchpointRecord], timeout_s: float = 20.0) -> None:
    """Produce the records and wait until scoring committed them (alerts are in the same transaction)."""
    settings = stack.settings
    async with stack.engine.connect() as conn:
        before = await conn.scalar(
            text("SELECT count(*) FROM processed_events WHERE tenant = :t"), {"t": settings.tenant}
        )
    await produce(settings, records)
    await wait_until(lambda: processed(stack, before + len(records)), timeout_s)


async def processed(stack: Stack, expected: int) -> bool:
    async with stack.engine.connect() as conn:
        seen = await conn.scalar(
            text("SELECT count(*) FROM processed_events WHERE tenant = :t"), {"t": stack.settings.tenant}
        )
    return seen >= expected


async def wait_until(predicate, timeout_s: float = 15.0, interval_s: float = 0.1):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def alerts_of(stack: Stack, **params) -> list[dict]:
    response = await stack.api.get("/v1/alerts", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return response.json()["items"]


async def transitions_of(stack: Stack) -> list:
    async with stack.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT seq, alert_id, kind, subject, from_status, to_status FROM alert_transitions "
                "WHERE tenant = :t ORDER BY seq"
            ),
            {"t": stack.settings.tenant},
        )
        return rows.all()


def assert_error(response: httpx.Response, status: int, field_name: str) -> dict:
    assert response.status_code == status, response.text
    (error,) = response.json()["detail"]
    assert error["field"] == field_name, error
    return error


# --------------------------------------------------------------------------------------------
# Scoring raises and resolves alerts.


async def test_every_at_risk_customer_has_one_open_alert_and_a_hot_event_raises_a_hot_alert(stack):
    t = stack.settings.tenant
    await score(
        stack,
        [
            touch(t, "q-exemplary", "reservation", 9.0, revenue=2000),  # gaps against the promise 8.0
            touch(t, "q-growth", "reservation", 9.0, revenue=100),
            touch(t, "q-risk-1", "reservation", 6.0, revenue=2000),
            touch(t, "q-risk-2", "reservation", 5.0, revenue=15_000),
            touch(t, "q-disengaged", "reservation", 5.0, revenue=100),
            touch(t, "q-hot", "reservation", 2.0, revenue=3500),  # gap -6 from a high-revenue customer
            touch(t, "q-cold", "reservation", 1.0, revenue=100),  # gap -7, but low revenue: no hot alert
        ],
    )
    at_risk = (await stack.api.get("/v1/customers", params={"quadrant": "at_risk", "limit": 500})).json()["items"]
    assert {c["customer_id"] for c in at_risk} == {"q-risk-1", "q-risk-2", "q-hot"}
    risk_alerts = await alerts_of(stack, kind="customer_at_risk", status="open")
    assert sorted(a["subject"] for a in risk_alerts) == ["q-hot", "q-risk-1", "q-risk-2"]  # one each
    by_subject = {a["subject"]: a for a in risk_alerts}
    assert by_subject["q-risk-2"]["severity"] == "critical"  # 15 x the threshold
    assert by_subject["q-risk-1"]["severity"] == "medium"
    assert by_subject["q-risk-1"]["revenue_at_stake"] == pytest.approx(2000, rel=1e-4)  # decays a little
    evidence = by_subject["q-risk-1"]["evidence"]
    assert evidence["quadrant"] == "at_risk" and evidence["experience_index"] == pytest.approx(-2.0)
    assert evidence["revenue_threshold"] == 1000.0 and evidence["last_event_id"].startswith("ev-")

    (hot,) = await alerts_of(stack, kind="customer_hot")
    assert hot["subject"] == "q-hot" and hot["status"] == "open" and hot["severity"] == "high"
    assert hot["evidence"]["worst_gap"] == pytest.approx(-6.0) and len(hot["evidence"]["events"]) == 1

    # The customer view lists the customer's unresolved alerts.
    view = (await stack.api.get("/v1/customers/q-hot")).json()
    assert sorted(a["kind"] for a in view["open_alerts"]) == ["customer_at_risk", "customer_hot"]
    assert (await stack.api.get("/v1/customers/q-exemplary")).json()["open_alerts"] == []

    # A repeated trigger updates the open alert: new figures, never a second alert.
    opened_at = by_subject["q-risk-2"]["opened_at"]
    await score(stack, [touch(t, "q-risk-2", "reservation", 4.0, revenue=500)])
    (again,) = await alerts_of(stack, kind="customer_at_risk", subject="q-risk-2")
    assert again["id"] == by_subject["q-risk-2"]["id"] and again["opened_at"] == opened_at
    assert datetime.fromisoformat(again["updated_at"]) > datetime.fromisoformat(opened_at)
    assert again["evidence"]["events"] == 2


async def test_a_customer_leaving_at_risk_resolves_their_alert_by_itself(stack):
    t = stack.settings.tenant
    await score(stack, [touch(t, "q-mover", "return", 6.5, revenue=2500, minutes_ago=10)])  # gap -2
    (alert,) = await alerts_of(stack, subject="q-mover", status="open")
    assert alert["kind"] == "customer_at_risk"
    # Three good experiences lift the index above the threshold: exemplary now.
    await score(stack, [touch(t, "q-mover", "return", 10.0, minutes_ago=m) for m in (3, 2, 1)])
    assert (await stack.api.get("/v1/customers/q-mover")).json()["quadrant"] == "exemplary"
    resolved = (await stack.api.get(f"/v1/alerts/{alert['id']}")).json()
    assert resolved["status"] == "resolved" and resolved["resolved_by"] is None and resolved["resolved_at"]
    assert resolved["evidence"]["quadrant"] == "at_risk"  # what opened it, and what resolved it
    assert resolved["evidence"]["resolution"]["quadrant"] == "exemplary"
    assert (await stack.api.get("/v1/customers/q-mover")).json()["open_alerts"] == []


async def test_a_failing_stage_opens_a_stage_alert_that_resolves_when_the_stage_recovers(stack):
    t = stack.settings.tenant
    rule = CAR.stage("pickup").alert  # 20 events, mean gap <= -1.5 or shortfall rate >= 0.4
    incident = [touch(t, f"inc-{n}", "pickup", 3.5, revenue=100, minutes_ago=30 + n / 10) for n in range(25)]
    await score(stack, incident[:15])
    assert await alerts_of(stack, kind="stage_shortfall", subject="car-rental/pickup") == []  # too few yet
    await score(stack, incident[15:])
    (alert,) = await alerts_of(stack, kind="stage_shortfall", status="open")
    assert alert["subject"] == "car-rental/pickup" and alert["journey"] == "car-rental"
    evidence = alert["evidence"]
    assert evidence["events"] == 25 and evidence["mean_gap"] == pytest.approx(-4.0)
    assert evidence["shortfall_rate"] == 1.0 and evidence["breaches"] == ["mean_gap", "shortfall_rate"]
    assert (evidence["min_events"], evidence["mean_gap_below"]) == (rule.min_events, rule.mean_gap_below)
    assert evidence["window"] == "1h" and len(evidence["last_event_ids"]) == 10
    assert alert["revenue_at_stake"] == pytest.approx(2500) and alert["severity"] == "medium"

    # Good service again: 150 events with gap +1.5 bring the hour's figures back within limits.
    await score(stack, [touch(t, f"ok-{n}", "pickup", 9.0, minutes_ago=5 - n / 100) for n in range(150)])
    resolved = (await stack.api.get(f"/v1/alerts/{alert['id']}")).json()
    assert resolved["status"] == "resolved"
    resolution = resolved["evidence"]["resolution"]
    assert resolution["events"] > 25 and resolution["breaches"] == [] and resolution["shortfall_rate"] < 0.4
    assert await alerts_of(stack, kind="stage_shortfall", status="open") == []


async def test_a_stage_alert_resolves_when_traffic_stops(stack):
    t = stack.settings.tenant
    await score(stack, [touch(t, f"road-{n}", "on-road-assistance", 2.0, minutes_ago=20) for n in range(6)])
    (alert,) = await alerts_of(stack, subject="car-rental/on-road-assistance", status="open")
    journeys, window = JourneyCatalog(JOURNEYS), stack.settings.alert_stage_window_minutes
    # Still failing now: the timer only refreshes the figures, and keeps the events the alert named.
    assert await reevaluate_stage_alerts(stack.engine, journeys, window, tenant=t) == []
    refreshed = (await stack.api.get(f"/v1/alerts/{alert['id']}")).json()
    assert len(refreshed["evidence"]["last_event_ids"]) == 6
    assert refreshed["evidence"]["last_event_ids"] == alert["evidence"]["last_event_ids"]
    # An hour later the window is empty: too few events to say the stage fails, so it resolves.
    later = datetime.now(timezone.utc) + timedelta(minutes=61)
    (resolution,) = await reevaluate_stage_alerts(stack.engine, journeys, window, now=later, tenant=t)
    assert (resolution.alert_id, resolution.from_status, resolution.to_status) == (
        uuid.UUID(alert["id"]), "open", "resolved",
    )  # fmt: skip
    assert "fewer than the 5" in resolution.payload["reason"]
    assert (await stack.api.get(f"/v1/alerts/{alert['id']}")).json()["status"] == "resolved"


# --------------------------------------------------------------------------------------------
# People acknowledge and resolve.


async def test_people_acknowledge_then_resolve_and_illegal_steps_are_409(stack):
    t = stack.settings.tenant
    await score(stack, [touch(t, "q-life", "billing", 5.0, revenue=1500)])
    (alert,) = await alerts_of(stack, subject="q-life")
    url = f"/v1/alerts/{alert['id']}"

    acknowledged = await stack.api.post(f"{url}/acknowledge", json={"by": "agent-7", "note": "calling them"})
    assert acknowledged.status_code == 200, acknowledged.text
    body = acknowledged.json()
    assert (body["status"], body["acknowledged_by"], body["note"]) == ("acknowledged", "agent-7", "calling them")
    error = assert_error(await stack.api.post(f"{url}/acknowledge", json={"by": "agent-8"}), 409, "status")
    assert "already acknowledged" in error["message"] and "agent-7" in error["message"]
    assert error["allowed"] == ["resolve"]

    # Still at risk and acknowledged: new figures keep the person's acknowledgement.
    await score(stack, [touch(t, "q-life", "billing", 5.5)])
    assert (await stack.api.get(url)).json()["status"] == "acknowledged"

    resolved = await stack.api.post(f"{url}/resolve", json={"by": "agent-7"})
    assert resolved.status_code == 200, resolved.text
    assert (resolved.json()["status"], resolved.json()["resolved_by"]) == ("resolved", "agent-7")
    assert resolved.json()["note"] == "calling them"
    error = assert_error(await stack.api.post(f"{url}/resolve", json={"by": "agent-7"}), 409, "status")
    assert "already resolved" in error["message"] and error["allowed"] == []
    error = assert_error(await stack.api.post(f"{url}/acknowledge", json={"by": "x"}), 409, "status")
    assert "cannot be acknowledged" in error["message"]

    transitions = [(r.from_status, r.to_status) for r in await transitions_of(stack) if str(r.alert_id) == alert["id"]]
    assert transitions == [(None, "open"), ("open", "acknowledged"), ("acknowledged", "resolved")]

    # The customer is still at risk: their next event opens a new alert.
    await score(stack, [touch(t, "q-life", "billing", 5.0)])
    (reopened,) = await alerts_of(stack, subject="q-life", status="open")
    assert reopened["id"] != alert["id"]


async def test_unknown_alerts_are_404_and_bad_bodies_422(stack):
    missing = str(uuid.uuid4())
    assert "does not exist" in assert_error(await stack.api.get(f"/v1/alerts/{missing}"), 404, "alert_id")["message"]
    assert_error(await stack.api.get("/v1/alerts/not-an-id"), 404, "alert_id")
    assert_error(await stack.api.post(f"/v1/alerts/{missing}/resolve", json={"by": "a"}), 404, "alert_id")
    assert_error(await stack.api.post(f"/v1/alerts/{missing}/resolve", json={}), 422, "by")
    assert_error(await stack.api.post(f"/v1/alerts/{missing}/resolve", json={"by": "a", "nte": "x"}), 422, "nte")


async def test_the_list_filters_orders_and_pages(stack):
    everything = await alerts_of(stack)
    assert len(everything) >= 5
    opened = [a["opened_at"] for a in everything]
    assert opened == sorted(opened, reverse=True)  # -opened_at by default
    by_value = await alerts_of(stack, order="-revenue_at_stake")
    values = [a["revenue_at_stake"] for a in everything]
    assert [a["revenue_at_stake"] for a in by_value] == sorted(values, reverse=True)
    for order in ("-opened_at", "opened_at", "-revenue_at_stake", "revenue_at_stake"):
        pages, cursor = [], None
        while True:
            params = {"order": order, "limit": 2, **({"cursor": cursor} if cursor else {})}
            body = (await stack.api.get("/v1/alerts", params=params)).json()
            pages += [a["id"] for a in body["items"]]
            if not (cursor := body["next_cursor"]):
                break
        assert pages == [a["id"] for a in await alerts_of(stack, order=order)]
        assert sorted(pages) == sorted(a["id"] for a in everything)
    unresolved = await alerts_of(stack, status="open,acknowledged")
    assert {a["status"] for a in unresolved} <= {"open", "acknowledged"}
    assert len(unresolved) == len([a for a in everything if a["status"] != "resolved"])
    assert all(a["severity"] == "critical" for a in await alerts_of(stack, severity="critical"))
    error = assert_error(await stack.api.get("/v1/alerts", params={"status": "opened"}), 422, "status")
    assert error["allowed"] == ["open", "acknowledged", "resolved"]
    assert_error(await stack.api.get("/v1/alerts", params={"kind": "fire"}), 422, "kind")
    assert_error(await stack.api.get("/v1/alerts", params={"order": "-revenue"}), 422, "order")
    assert_error(await stack.api.get("/v1/alerts", params={"journey": "spaceship"}), 422, "journey")
    token = (await stack.api.get("/v1/alerts", params={"limit": 1})).json()["next_cursor"]
    other_order = {"cursor": token, "order": "-revenue_at_stake"}
    assert_error(await stack.api.get("/v1/alerts", params=other_order), 422, "cursor")


# --------------------------------------------------------------------------------------------
# Delivery: the stream, the topic, the webhook, the metrics. These come last: they check that
# everything the tests above did was delivered.


async def test_the_stream_delivers_every_transition_in_order_and_resumes_after_last_event_id(stack):
    t = stack.settings.tenant
    await score(stack, [touch(t, "q-stream", "reservation", 1.5, revenue=4000)])  # at risk and hot
    logged = await transitions_of(stack)
    assert len(logged) >= 10
    await wait_until(lambda: _async(len(stack.stream.events) >= len(logged)))
    seen = stack.stream.events
    assert [e.id for e in seen] == [r.seq for r in logged]  # each once, in order, no gaps
    assert all(e.event == "alert" for e in seen)
    assert [(e.data["alert_id"], e.data["from"], e.data["to"]) for e in seen] == [
        (str(r.alert_id), r.from_status, r.to_status) for r in logged
    ]
    last = seen[-1].data
    assert last["tenant"] == t and last["alert"]["id"] == last["alert_id"] and last["reason"]
    assert stack.stream.comments >= 2  # the opening comment and heartbeats

    # A client that drops after the k-th event resumes with the next one.
    for header, params in (({"Last-Event-ID": str(seen[3].id)}, {}), ({}, {"last_event_id": str(seen[3].id)})):
        resumed = SseClient().start(stack.api, httpx.URL("/v1/alerts/stream", params=params), header)
        try:
            await wait_until(lambda: _async(len(resumed.events) >= len(seen) - 4))
            assert [e.id for e in resumed.events] == [e.id for e in seen[4:]]
        finally:
            await resumed.stop()
    assert_error(await stack.api.get("/v1/alerts/stream", headers={"Last-Event-ID": "x1"}), 422, "Last-Event-ID")


async def _async(value):
    return value


async def test_the_alerts_topic_and_the_webhook_get_every_transition(stack):
    logged = await transitions_of(stack)
    consumer = AIOKafkaConsumer(
        stack.settings.alerts_topic, bootstrap_servers=stack.settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )  # fmt: skip
    await consumer.start()
    published: dict[int, tuple] = {}
    order_per_key: dict[bytes, list[int]] = {}
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while len(published) < len(logged) and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    document = orjson.loads(record.value)
                    if document["tenant"] != stack.settings.tenant:
                        continue
                    published[document["seq"]] = (record.key, dict(record.headers), document)
                    order_per_key.setdefault(record.key, []).append(document["seq"])
    finally:
        await consumer.stop()
    assert sorted(published) == [r.seq for r in logged]  # at-least-once, and here exactly once
    for row in logged:
        key, headers, document = published[row.seq]
        assert key == row.subject.encode() and headers["schema"] == b"alert.v1"
        transition = (document["alert_id"], document["from"], document["to"])
        assert transition == (str(row.alert_id), row.from_status, row.to_status)
    assert all(seqs == sorted(seqs) for seqs in order_per_key.values())  # a subject's transitions in order

    await wait_until(lambda: _async(len(stack.webhook) >= len(logged)))
    posted = [orjson.loads(body) for _, body in stack.webhook]
    assert [d["seq"] for d in posted if d["tenant"] == stack.settings.tenant] == [r.seq for r in logged]
    for headers, body in stack.webhook:
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-cem-signature"] == expected


async def test_metrics_count_transitions_and_open_alerts(stack):
    logged = await transitions_of(stack)
    made: dict[tuple[str, str], int] = {}
    for row in logged:
        made[(row.kind, row.to_status)] = made.get((row.kind, row.to_status), 0) + 1
    now = transition_counts()
    for key, number in made.items():
        assert now.get(key, 0) - stack.counted_before.get(key, 0) == number, key
    await refresh_gauges(stack.engine, stack.settings)
    for kind in ("customer_at_risk", "customer_hot", "stage_shortfall"):
        unresolved = len(await alerts_of(stack, kind=kind, status="open,acknowledged"))
        assert REGISTRY.get_sample_value("cem_alerts_open", {"kind": kind}) == unresolved
    metrics = (await stack.api.get("/metrics")).text
    assert "cem_alert_transitions_total" in metrics


async def test_customer_gauges_equal_a_count_over_the_customers(stack):
    """cem_customers and cem_revenue come from the quadrant totals: they must equal a GROUP BY over
    the tenant's customers, revenue valued at the database's now (future events at full value); rel=1e-6
    allows for the seconds between the two reads (2 ** -(1 / 7.8e6) per second at 90 days)."""
    t = stack.settings.tenant
    await score(
        stack,
        [
            touch(t, "g-kept", "reservation", 9.5, revenue=5000),
            touch(t, "g-poor", "reservation", 1.0, revenue=10),
            touch(t, "g-ahead", "reservation", 6.0, revenue=900, minutes_ago=-2),  # counted at full value
        ],
    )
    async with stack.engine.connect() as conn:
        await refresh_gauges(stack.engine, stack.settings)
        rows = await conn.execute(
            text(
                "SELECT quadrant, count(*) AS customers, sum(revenue_sum * "
                "power(2, least(0, extract(epoch FROM last_event_at - now())) / :half_life)) AS revenue "
                "FROM customers WHERE tenant = :tenant GROUP BY quadrant"
            ),
            {"tenant": stack.settings.tenant, "half_life": stack.settings.revenue_half_life_s},
        )
        counted = {row.quadrant: row for row in rows}
    assert sum(row.customers for row in counted.values()) >= 3
    for quadrant in ("exemplary", "growth", "at_risk", "disengaged"):
        row = counted.get(quadrant)
        assert REGISTRY.get_sample_value("cem_customers", {"quadrant": quadrant}) == (row.customers if row else 0)
        revenue = REGISTRY.get_sample_value("cem_revenue", {"quadrant": quadrant})
        assert revenue == pytest.approx(float(row.revenue) if row else 0.0, rel=1e-6, abs=1e-6), quadrant


# --------------------------------------------------------------------------------------------
# The relays on their own.


async def test_one_relay_delivers_at_a_time_and_a_restarted_one_resumes_from_its_position(stack):
    from services.scoring.relay import run_relay

    relay = f"test:{uuid.uuid4().hex[:8]}"
    delivered: list[int] = []

    async def deliver(documents):
        delivered.extend(document["seq"] for document in documents)

    async with stack.engine.connect() as conn:
        last = await conn.scalar(text("SELECT max(seq) FROM alert_transitions"))
    replicas = [asyncio.create_task(run_relay(stack.engine, relay, deliver, interval_s=0.05)) for _ in range(2)]
    try:
        await wait_until(lambda: _async(delivered and delivered[-1] >= last))
        await asyncio.sleep(0.3)
    finally:
        for task in replicas:
            task.cancel()
        await asyncio.gather(*replicas, return_exceptions=True)
    assert delivered == sorted(set(delivered)) and delivered[-1] == last  # once each, in seq order

    t = stack.settings.tenant
    await score(stack, [touch(t, "q-relay", "reservation", 5.0, revenue=1200)])  # a new transition
    restarted = asyncio.create_task(run_relay(stack.engine, relay, deliver, interval_s=0.05))
    try:
        await wait_until(lambda: _async(delivered[-1] > last))
    finally:
        restarted.cancel()
        await asyncio.gather(restarted, return_exceptions=True)
    assert delivered == sorted(set(delivered))  # nothing delivered twice after the restart


async def test_the_webhook_retries_with_backoff_and_counts_what_it_gives_up(stack):
    from services.scoring.relay import WebhookAlerts

    answers = iter([503, 500, 200, 503, 503, 503])
    calls: list[bytes] = []

    async def hook(request: Request) -> Response:
        calls.append(await request.body())
        return Response(status_code=next(answers))

    async with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as url:
        update = {"alert_webhook_url": f"{url}/hook", "alert_webhook_max_attempts": 3}
        settings = stack.settings.model_copy(update=update)
        webhook = WebhookAlerts(settings, first_backoff_s=0.01)
        failures = REGISTRY.get_sample_value("cem_alert_webhook_failures_total")
        try:
            assert await webhook.post({"seq": 1, "kind": "customer_hot"}) is True  # third attempt
            assert await webhook.post({"seq": 2, "kind": "customer_hot"}) is False  # three 503s: given up
        finally:
            await webhook.close()
    assert len(calls) == 6
    assert REGISTRY.get_sample_value("cem_alert_webhook_failures_total") == failures + 1
