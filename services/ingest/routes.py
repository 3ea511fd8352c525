"""Ingest's HTTP endpoints: one event, a batch, health and readiness (SPEC 4)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response

from services.core.access import EventsWriterTenant
from services.core.events import (
    FIELDS, EventInvalid, FieldError, TouchpointRecord, ValidationContext, utc_now, validate_event,
)  # fmt: skip
from services.core.http import field_error
from services.core.journeys import Journey
from services.core.metrics import INGEST_EVENTS
from services.core.settings import Settings
from services.ingest.openapi import BATCH_ROUTE, EVENT_ROUTE
from services.ingest.producer import BrokerUnavailable, Overloaded, TouchpointProducer

MAX_EVENT_BYTES = 64 * 1024  # a valid event is a few KiB at most (attributes <= 2 KiB): more is a mistake
JSON = "application/json"
NDJSON = "application/x-ndjson"
RETRY_AFTER_S = "1"
BROKER_UNAVAILABLE = (
    "the event broker is unavailable or did not acknowledge in time; nothing in this request was accepted. "
    "Retry the request with the same event ids: duplicates are dropped."
)
OVERLOADED = (
    "ingest is overloaded: too many events are waiting for the broker's acknowledgement; nothing in this "
    "request was accepted. Retry after the Retry-After delay with the same event ids."
)
# Metric label values: bounded, whatever the client sends (an unknown field's name is not one).
REJECT_REASONS = frozenset({*FIELDS, "(event)", "(body)"})

router = APIRouter()


# Dependencies are async: sync ones would each take a trip through the thread pool.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


# The tenant a request writes for: the one of its API key (scope events:write), never the body's.
TenantDep = EventsWriterTenant


async def get_journeys(request: Request) -> dict[str, Journey]:
    return request.app.state.journeys


async def get_producer(request: Request) -> TouchpointProducer:
    return request.app.state.producer


ProducerDep = Annotated[TouchpointProducer, Depends(get_producer)]


async def get_validation_context(
    settings: SettingsDep, tenant: TenantDep, journeys: Annotated[dict[str, Journey], Depends(get_journeys)]
) -> ValidationContext:
    return ValidationContext(
        tenant=tenant,
        journeys=journeys,
        now=utc_now(),
        max_event_age_s=settings.max_event_age_s,
        max_future_skew_s=settings.max_future_skew_s,
    )


ContextDep = Annotated[ValidationContext, Depends(get_validation_context)]


@router.post("/v1/events", status_code=202, **EVENT_ROUTE)
async def post_event(request: Request, context: ContextDep, producer: ProducerDep) -> Response:
    _shed_if_saturated(producer)
    _require_media_type(request, {JSON})
    body = await _read_body(request, MAX_EVENT_BYTES, "a valid event is a few KiB (attributes at most 2 KiB)")
    payload = _parse_json(body)
    try:
        record = validate_event(payload, context)
    except EventInvalid as invalid:
        _count_rejected(invalid.errors)
        raise HTTPException(422, detail=[error.to_dict() for error in invalid.errors]) from None
    await _produce(producer, [record])
    return _json({"event_id": record.event_id, "status": "accepted"}, status_code=202)


@router.post("/v1/events:batch", status_code=202, **BATCH_ROUTE)
async def post_batch(
    request: Request, context: ContextDep, producer: ProducerDep, settings: SettingsDep
) -> Response:
    _shed_if_saturated(producer)
    media_type = _require_media_type(request, {JSON, NDJSON})
    body = await _read_body(request, settings.batch_max_bytes, "split the events into several batches")
    items = _ndjson_items(body) if media_type == NDJSON else _json_batch_items(body)
    if len(items) > settings.batch_max_events:
        raise _body_rejected(
            413, f"the batch has {len(items)} events", f"at most {settings.batch_max_events} events per batch"
        )
    if not items:
        raise _body_rejected(422, "the batch has no events", f"1 to {settings.batch_max_events} events")

    results: list[dict[str, Any]] = []
    records: list[TouchpointRecord] = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, EventInvalid):  # an NDJSON line that is not JSON
                raise item
            record = validate_event(item, context)
        except EventInvalid as invalid:
            _count_rejected(invalid.errors)
            results.append({
                "index": index,
                "event_id": _posted_event_id(item, invalid.errors),
                "status": "rejected",
                "errors": [error.to_dict() for error in invalid.errors],
            })  # fmt: skip
        else:
            records.append(record)
            results.append({"index": index, "event_id": record.event_id, "status": "accepted"})
    if records:
        await _produce(producer, records)
    outcome = {"accepted": len(records), "rejected": len(items) - len(records), "results": results}
    return _json(outcome, status_code=202 if records else 422)


@router.get("/healthz", summary="The process is up")
async def healthz() -> Response:
    return _json({"status": "ok"})


@router.get("/readyz", summary="The broker answers and the topic exists")
async def readyz(producer: ProducerDep) -> Response:
    reason = await producer.not_ready_reason()
    if reason is not None:
        return _json({"status": "unavailable", "reason": reason}, status_code=503)
    return _json({"status": "ready"})


def _json(content: Any, status_code: int = 200) -> Response:
    # orjson, as a batch's results are the largest body of the hot path. Not ORJSONResponse: FastAPI
    # 0.165 deprecates it for return-type serialization, which cannot choose the status per outcome.
    return Response(orjson.dumps(content), status_code=status_code, media_type=JSON)


async def _produce(producer: TouchpointProducer, records: list[TouchpointRecord]) -> None:
    try:
        await producer.send_all(records)
    except BrokerUnavailable:
        INGEST_EVENTS.labels("failed", "broker_unavailable").inc(len(records))
        raise HTTPException(503, detail=BROKER_UNAVAILABLE, headers={"Retry-After": RETRY_AFTER_S}) from None
    except Overloaded:
        INGEST_EVENTS.labels("failed", "overloaded").inc(len(records))
        raise HTTPException(503, detail=OVERLOADED, headers={"Retry-After": RETRY_AFTER_S}) from None
    INGEST_EVENTS.labels("accepted", "").inc(len(records))


def _shed_if_saturated(producer: TouchpointProducer) -> None:
    """Refuse before reading the body: a saturated ingest spends nothing on work it cannot finish."""
    if producer.saturated:
        INGEST_EVENTS.labels("failed", "overloaded").inc()
        raise HTTPException(503, detail=OVERLOADED, headers={"Retry-After": RETRY_AFTER_S})


def _require_media_type(request: Request, allowed: set[str]) -> str:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in allowed:
        shown = f"content type '{media_type}'" if media_type else "a body without a content type"
        raise _body_rejected(415, f"{shown} is not supported", sorted(allowed))
    return media_type


async def _read_body(request: Request, limit_bytes: int, hint: str) -> bytes:
    """The body, read in chunks and abandoned as soon as it passes the limit."""
    too_large = f"at most {limit_bytes} bytes; {hint}"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise _body_rejected(413, f"the body is {declared} bytes, larger than {limit_bytes} bytes", too_large)
    body = bytearray()
    # A client may omit Content-Length (chunked) or understate it: count what actually arrives.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit_bytes:
            raise _body_rejected(413, f"the body is larger than {limit_bytes} bytes", too_large)
    return bytes(body)


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:  # its message says where: "line 1 column 7 (char 6)"
        raise _body_rejected(400, f"the body is not valid JSON: {error}") from None


def _json_batch_items(body: bytes) -> list[Any]:
    document = _parse_json(body)
    shape = 'an object {"events": [event, ...]}'
    if not isinstance(document, dict) or not isinstance(document.get("events"), list):
        raise _body_rejected(422, f"the body must be {shape}", shape, field="events")
    unknown = sorted(set(document) - {"events"})
    if unknown:
        raise _body_rejected(422, f"unknown field '{unknown[0]}' next to events", shape, field=unknown[0])
    return document["events"]


def _ndjson_items(body: bytes) -> list[Any]:
    """One item per non-blank line: the parsed event, or EventInvalid if the line is not JSON."""
    items: list[Any] = []
    for line_number, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as error:
            items.append(EventInvalid([FieldError("(event)", f"line {line_number} is not valid JSON: {error}")]))
    return items


def _posted_event_id(payload: Any, errors: list[FieldError]) -> str | None:
    event_id = payload.get("event_id") if isinstance(payload, dict) else None
    if not isinstance(event_id, str) or any(error.field == "event_id" for error in errors):
        return None
    return event_id


def _count_rejected(errors: list[FieldError]) -> None:
    top_field = errors[0].field.split(".")[0] if errors else "(event)"
    INGEST_EVENTS.labels("rejected", top_field if top_field in REJECT_REASONS else "(event)").inc()


def _body_rejected(status_code: int, message: str, allowed: Any = None, field: str = "(body)") -> HTTPException:
    """A request refused before its events could be told apart: counted as one rejected event."""
    INGEST_EVENTS.labels("rejected", "(body)").inc()
    return HTTPException(status_code, detail=[field_error(field, message, allowed)])
