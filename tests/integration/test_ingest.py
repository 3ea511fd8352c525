"""The ingest service in-process over HTTP, against the real broker: what a 202 puts on the topic,
what is refused and how, and what happens while the broker is down."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from prometheus_client import REGISTRY

from services.core.embedded import EmbeddedKafka, free_port
from services.core.journeys import load_journeys
from services.core.settings import Settings
from services.ingest.app import create_app

pytestmark = pytest.mark.integration

JOURNEYS = load_journeys(Settings().journeys_dir)
NDJSON = {"content-type": "application/x-ndjson"}


def ingest_settings(bootstrap_servers: str, **overrides: Any) -> Settings:
    """Settings with the test's own tenant and topics: tests share the broker, not the data."""
    unique = uuid.uuid4().hex[:10]
    values: dict[str, Any] = dict(
        tenant=f"t-{unique}",
        kafka_bootstrap_servers=bootstrap_servers,
        touchpoints_topic=f"cem.touchpoints.v1.{unique}",
        dlq_topic=f"cem.touchpoints.dlq.v1.{unique}",
        alerts_topic=f"cem.alerts.v1.{unique}",
        producer_idempotence=False,  # the embedded broker has no InitProducerId
        topic_partitions=4,
        producer_timeout_s=2.0,
        auth_disabled=True,  # the tenant is CEM_TENANT's; keys are tested in test_access.py
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(postgres, kafka: EmbeddedKafka) -> Settings:
    """Replaces conftest's `settings` here: the broker, and Postgres for the journey maps only."""
    return ingest_settings(kafka.bootstrap_servers, database_url=postgres.url())


@asynccontextmanager
async def running_ingest(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    # ASGITransport does not run the lifespan: run it around the client.
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
            yield client


@pytest.fixture
async def ingest(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_ingest(settings) as client:
        await eventually(lambda: is_ready(client), timeout_s=10)
        yield client


async def eventually(probe: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.1) -> float:
    """Wait until probe() is true; return the seconds it took."""
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not true after {timeout_s} s")
        await asyncio.sleep(interval_s)
    return time.monotonic() - started


async def is_ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


def touchpoint(**overrides: Any) -> dict[str, Any]:
    document = {
        "event_id": f"evt-{uuid.uuid4().hex[:12]}",
        "occurred_at": (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat(),
        "customer_id": "customer-42",
        "journey": "car-rental",
        "stage": "pickup",
        "experience": 6.0,
    }
    document.update(overrides)
    return document


def ndjson(*lines: Any) -> bytes:
    return b"\n".join(line if isinstance(line, bytes) else orjson.dumps(line) for line in lines)


async def topic_records(settings: Settings, timeout_s: float = 10.0) -> list[ConsumerRecord]:
    """Every record on the touchpoint topic, read up to the end offsets (acknowledged = there)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # fetches the metadata partitions_for_topic reads
        topic = settings.touchpoints_topic
        partitions = [TopicPartition(topic, partition) for partition in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end_offsets = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while [tp for tp in partitions if await consumer.position(tp) < end_offsets[tp]]:
            assert time.monotonic() < deadline, "the topic was not read to its end in time"
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def topic_event_ids(settings: Settings) -> list[str]:
    return sorted(orjson.loads(record.value)["event_id"] for record in await topic_records(settings))


def events_total(result: str, reason: str) -> float:
    return REGISTRY.get_sample_value("cem_ingest_events_total", {"result": result, "reason": reason}) or 0.0


async def test_health_and_readiness_with_the_broker_up(ingest: httpx.AsyncClient) -> None:
    assert (await ingest.get("/healthz")).json() == {"status": "ok"}
    response = await ingest.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


async def test_an_accepted_event_is_on_the_topic_keyed_by_customer_and_normalised(
    ingest: httpx.AsyncClient, settings: Settings
) -> None:
    posted = touchpoint(scale={"min": 1, "max": 5}, experience=4, channel="kiosk", attributes={"lane": 3})

    response = await ingest.post("/v1/events", json=posted)

    assert response.status_code == 202
    assert response.json() == {"event_id": posted["event_id"], "status": "accepted"}
    [record] = await topic_records(settings)
    assert record.key == f"{settings.tenant}:customer-42".encode()
    assert ("schema", b"touchpoint.v1") in list(record.headers)
    value = orjson.loads(record.value)
    promise = JOURNEYS["car-rental"].stage("pickup").promise
    assert value["tenant"] == settings.tenant
    assert value["event_id"] == posted["event_id"]
    assert value["experience"] == 7.5  # 4 on 1-5
    assert value["expectation"] == value["promise"] == promise  # absent: the stage's promise
    assert value["channel"] == "kiosk" and value["attributes"] == {"lane": 3}
    assert datetime.fromisoformat(value["received_at"]) >= datetime.fromisoformat(value["occurred_at"])
    assert "scale" not in value


async def test_an_invalid_event_is_422_with_field_errors(ingest: httpx.AsyncClient) -> None:
    response = await ingest.post("/v1/events", json=touchpoint(stage="pikcup", experiance=5))

    assert response.status_code == 422
    fields = {error["field"]: error for error in response.json()["detail"]}
    assert set(fields) == {"experiance"}  # structural errors come first, alone
    response = await ingest.post("/v1/events", json=touchpoint(stage="pikcup"))
    [error] = response.json()["detail"]
    assert error["field"] == "stage" and "known stages: reservation, pickup" in error["message"]
    assert error["allowed"] == JOURNEYS["car-rental"].stage_ids


async def test_a_json_batch_writes_the_valid_events_and_reports_each_by_index(
    ingest: httpx.AsyncClient, settings: Settings
) -> None:
    valid = [touchpoint(customer_id=f"customer-{index}") for index in range(3)]
    missing_id = touchpoint()
    del missing_id["event_id"]
    events = [valid[0], touchpoint(journey="car-rentl"), valid[1], missing_id, valid[2]]

    response = await ingest.post("/v1/events:batch", json={"events": events})

    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (3, 2)
    assert [(result["index"], result["status"]) for result in body["results"]] == [
        (0, "accepted"), (1, "rejected"), (2, "accepted"), (3, "rejected"), (4, "accepted"),
    ]  # fmt: skip
    assert body["results"][1]["event_id"] == events[1]["event_id"]
    assert body["results"][1]["errors"][0]["field"] == "journey"
    assert body["results"][3]["event_id"] is None
    assert "errors" not in body["results"][0]
    assert await topic_event_ids(settings) == sorted(event["event_id"] for event in valid)


async def test_an_ndjson_batch_skips_blank_lines_and_rejects_lines_that_are_not_json(
    ingest: httpx.AsyncClient, settings: Settings
) -> None:
    first, last = touchpoint(), touchpoint(customer_id="customer-7")
    body = ndjson(first, b"", touchpoint(emotion="sad"), b"   ", b'{"event_id": "x",', last, b"")

    response = await ingest.post("/v1/events:batch", content=body, headers=NDJSON)

    assert response.status_code == 202
    results = response.json()["results"]
    assert [result["status"] for result in results] == ["accepted", "rejected", "rejected", "accepted"]
    assert results[1]["errors"][0]["field"] == "emotion"
    [broken] = results[2]["errors"]
    assert broken["field"] == "(event)"
    assert broken["message"].startswith("line 5 is not valid JSON")
    assert results[2]["event_id"] is None
    assert await topic_event_ids(settings) == sorted([first["event_id"], last["event_id"]])


async def test_a_batch_without_a_valid_event_is_422_with_the_results(
    ingest: httpx.AsyncClient, settings: Settings
) -> None:
    response = await ingest.post("/v1/events:batch", json={"events": [touchpoint(experience=11), "event"]})

    assert response.status_code == 422
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (0, 2)
    assert [result["errors"][0]["field"] for result in body["results"]] == ["experience", "(event)"]
    assert await topic_records(settings) == []


@pytest.mark.parametrize("media", ["json", "ndjson"])
async def test_a_batch_of_more_than_1000_events_is_413(ingest: httpx.AsyncClient, media: str) -> None:
    events = [touchpoint() for _ in range(1001)]
    if media == "json":
        response = await ingest.post("/v1/events:batch", json={"events": events})
    else:
        response = await ingest.post("/v1/events:batch", content=ndjson(*events), headers=NDJSON)

    assert response.status_code == 413
    [error] = response.json()["detail"]
    assert "1001 events" in error["message"] and "at most 1000 events" in error["allowed"]


async def test_a_batch_of_exactly_1000_events_is_accepted(ingest: httpx.AsyncClient, settings: Settings) -> None:
    events = [touchpoint(customer_id=f"customer-{index % 37}") for index in range(1000)]

    response = await ingest.post("/v1/events:batch", content=ndjson(*events), headers=NDJSON)

    assert (response.status_code, response.json()["accepted"]) == (202, 1000)
    assert len(await topic_records(settings)) == 1000


async def test_a_body_over_the_byte_limit_is_413_whether_declared_or_streamed(ingest: httpx.AsyncClient) -> None:
    limit = 1_048_576
    oversized = b'{"events": [' + b" " * limit + b"]}"
    declared = await ingest.post("/v1/events:batch", content=oversized, headers={"content-type": "application/json"})

    chunks_sent = 0

    async def undeclared_stream() -> AsyncIterator[bytes]:
        # No Content-Length (chunked): the limit must hold on the bytes read, and reading stop there.
        nonlocal chunks_sent
        for _ in range(64):
            chunks_sent += 1
            yield b" " * 65536

    streamed = await ingest.post("/v1/events:batch", content=undeclared_stream(), headers=NDJSON)

    for response in (declared, streamed):
        assert response.status_code == 413
        [error] = response.json()["detail"]
        assert error["field"] == "(body)"
        assert f"larger than {limit} bytes" in error["message"]
        assert f"at most {limit} bytes" in error["allowed"]
    assert "transfer-encoding" in streamed.request.headers and "content-length" not in streamed.request.headers
    assert chunks_sent <= limit // 65536 + 2


async def test_a_single_event_over_64_kib_is_413(ingest: httpx.AsyncClient) -> None:
    response = await ingest.post("/v1/events", json=touchpoint(attributes={"note": "x" * 70_000}))
    assert response.status_code == 413
    assert "65536 bytes" in response.json()["detail"][0]["message"]


@pytest.mark.parametrize("path", ["/v1/events", "/v1/events:batch"])
async def test_malformed_json_is_400_saying_where_it_broke(ingest: httpx.AsyncClient, path: str) -> None:
    response = await ingest.post(path, content=b'{"event_id": "e1",\n "stage": }', headers={"content-type": "application/json"})

    assert response.status_code == 400
    [error] = response.json()["detail"]
    assert error["field"] == "(body)"
    assert error["message"].startswith("the body is not valid JSON")
    assert "line 2 column" in error["message"]


async def test_a_batch_document_of_the_wrong_shape_is_422(ingest: httpx.AsyncClient) -> None:
    for document in ([touchpoint()], {"event": [touchpoint()]}, {"events": [touchpoint()], "tenant": "x"}):
        response = await ingest.post("/v1/events:batch", json=document)
        assert response.status_code == 422, document
        assert response.json()["detail"][0]["message"]


async def test_a_wrong_content_type_is_415(ingest: httpx.AsyncClient) -> None:
    single = await ingest.post("/v1/events", content=orjson.dumps(touchpoint()), headers={"content-type": "text/plain"})
    batch = await ingest.post("/v1/events:batch", data={"events": "x"})  # a form

    assert (single.status_code, batch.status_code) == (415, 415)
    assert single.json()["detail"][0]["allowed"] == ["application/json"]
    assert batch.json()["detail"][0]["allowed"] == ["application/json", "application/x-ndjson"]


async def test_metrics_count_events_by_result_and_reason(ingest: httpx.AsyncClient) -> None:
    accepted, rejected = events_total("accepted", ""), events_total("rejected", "stage")
    unknown_field = events_total("rejected", "(event)")

    await ingest.post("/v1/events", json=touchpoint())
    await ingest.post("/v1/events", json=touchpoint(stage="nowhere"))
    await ingest.post("/v1/events", json=touchpoint(**{"customer-name": "Kim"}))

    assert events_total("accepted", "") == accepted + 1
    assert events_total("rejected", "stage") == rejected + 1
    # An unknown field's name is the client's text: it is not a label value.
    assert events_total("rejected", "(event)") == unknown_field + 1
    text = (await ingest.get("/metrics")).text
    assert 'cem_ingest_events_total{reason="stage",result="rejected"}' in text
    assert "customer-name" not in text
    assert 'cem_ingest_request_duration_seconds_count{method="POST",route="/v1/events",status="202"}' in text
    assert "cem_ingest_produce_duration_seconds_count" in text


async def test_while_the_broker_is_down_writes_are_503_and_ingest_recovers_by_itself(postgres) -> None:
    broker = EmbeddedKafka()
    broker.start()
    restarted: EmbeddedKafka | None = None
    settings = ingest_settings(broker.bootstrap_servers, producer_timeout_s=1.0, database_url=postgres.url())
    try:
        async with running_ingest(settings) as ingest:
            await eventually(lambda: is_ready(ingest), timeout_s=10)
            assert (await ingest.post("/v1/events", json=touchpoint())).status_code == 202
            failed = events_total("failed", "broker_unavailable")

            broker.stop(timeout_s=0.5)  # tansu drains connections for seconds on SIGTERM; a crash will do

            single = await ingest.post("/v1/events", json=touchpoint())
            batch = await ingest.post("/v1/events:batch", json={"events": [touchpoint(), touchpoint(stage="x")]})
            for response in (single, batch):
                assert response.status_code == 503
                assert response.headers["retry-after"] in {"1", "2"}
                assert "broker is unavailable" in response.json()["detail"]
                assert "same event ids" in response.json()["detail"]
                assert "accepted" not in response.json()
            assert events_total("failed", "broker_unavailable") == failed + 2
            # Bad input is still bad input: 422, not 503.
            assert (await ingest.post("/v1/events", json=touchpoint(stage="x"))).status_code == 422
            readiness = await ingest.get("/readyz")
            assert readiness.status_code == 503 and readiness.json()["reason"]

            restarted = EmbeddedKafka(port=broker.port)
            restarted.start()  # empty: the embedded broker keeps topics in memory

            async def accepts_again() -> bool:
                return (await ingest.post("/v1/events", json=touchpoint())).status_code == 202

            await eventually(accepts_again, timeout_s=15, interval_s=0.2)
            await eventually(lambda: is_ready(ingest), timeout_s=10)
    finally:
        broker.stop()
        if restarted is not None:
            restarted.stop()


async def test_ingest_starts_without_a_broker_and_connects_when_one_appears(postgres) -> None:
    port = free_port()
    settings = ingest_settings(f"127.0.0.1:{port}", database_url=postgres.url())
    broker = EmbeddedKafka(port=port)
    try:
        async with running_ingest(settings) as ingest:
            assert (await ingest.get("/healthz")).status_code == 200
            readiness = await ingest.get("/readyz")
            assert readiness.status_code == 503
            assert "not started" in readiness.json()["reason"]
            response = await ingest.post("/v1/events", json=touchpoint())
            assert response.status_code == 503 and response.headers["retry-after"]

            broker.start()

            await eventually(lambda: is_ready(ingest), timeout_s=15)
            posted = touchpoint()
            assert (await ingest.post("/v1/events", json=posted)).status_code == 202
            assert await topic_event_ids(settings) == [posted["event_id"]]
    finally:
        broker.stop()
