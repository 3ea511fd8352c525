"""Ingest's HTTP endpoints: one event, a batch, health and readiness (SPEC 4)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase
from starlette.requests import ClientDisconnect

from services.core.access import authorized, bearer_scheme
from services.core.auth import EVENTS_WRITE
from services.core.events import (
    FIELDS, EncodedRecord, EventInvalid, FieldError, ValidationContext, encode_event, encode_events, utc_now,
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
JOURNEYS_NOT_LOADED = (
    "the tenants' journey maps have not been read from the database since ingest started (it is "
    "unreachable); nothing in this request was accepted. Retry after the Retry-After delay."
)
# Metric label values: bounded, whatever the client sends (an unknown field's name is not one).
REJECT_REASONS = frozenset({*FIELDS, "(event)", "(body)"})
_ACCEPTED = INGEST_EVENTS.labels("accepted", "")  # bound once: `labels()` locks and looks up per call

Endpoint = Callable[[Request], Awaitable[Response]]


class RequestOnlyRoute(APIRoute):
    """A route whose endpoint takes the Request alone and checks everything itself, so FastAPI
    calls it directly: no dependency solving, body parsing or response serialisation per request
    (with get_tenant -> get_caller -> the scheme, the journeys and the context as dependencies,
    those were over a third of the CPU of one event). OpenAPI is built from the declaration as
    usual. Its dependencies may only be security schemes, which document the route and are not
    run: the endpoint authenticates itself (`writer_context`). Add it to a router without
    dependencies (they would not run either)."""

    def __init__(self, path: str, endpoint: Endpoint, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        parameters = list(inspect.signature(endpoint).parameters)
        if parameters != ["request"] or any(
            not isinstance(dependency.call, SecurityBase) for dependency in self.dependant.dependencies
        ):
            raise TypeError(f"{path}: the endpoint must take `request` only, and depend on security schemes only")

    def get_route_handler(self) -> Endpoint:
        return self.endpoint


# Documents the apiKey scheme with the scope events:write in OpenAPI; `writer_context` checks it.
EVENTS_WRITE_SCOPES = [EVENTS_WRITE]
EVENTS_WRITE_SECURITY = [Security(bearer_scheme, scopes=EVENTS_WRITE_SCOPES)]


def add_routes(router: APIRouter) -> None:
    """Ingest's routes, on the app's own router: an included APIRouter costs every request a
    second round of route matching (FastAPI 0.165 keeps it as one route of the app)."""
    for path, endpoint, documented in (("/v1/events", post_event, EVENT_ROUTE),
                                       ("/v1/events:batch", post_batch, BATCH_ROUTE)):  # fmt: skip
        router.add_api_route(
            path, endpoint, methods=["POST"], status_code=202, dependencies=EVENTS_WRITE_SECURITY,
            route_class_override=RequestOnlyRoute, **documented,
        )  # fmt: skip
    router.add_api_route("/healthz", healthz, methods=["GET"], summary="The process is up")
    router.add_api_route(
        "/readyz", readyz, methods=["GET"],
        summary="The broker answers, the topic exists and the journey maps were read",
    )  # fmt: skip


def direct_routes(router: APIRouter) -> dict[tuple[str, str], RequestOnlyRoute]:
    """The router's RequestOnlyRoutes by (method, path), for RequestGuard to call without the
    framework's layers (services.core.http); nothing else of the route's needs them."""
    return {
        (method, route.path): route
        for route in router.routes
        if isinstance(route, RequestOnlyRoute)
        for method in route.methods
    }


async def get_journeys(request: Request, tenant: str) -> dict[str, Journey]:
    """The tenant's journeys: shipped maps, replaced or extended by its own stored versions."""
    catalog = request.app.state.journey_loader.catalog
    if not catalog.loaded:  # validating against maps the tenant may have changed would accept wrong events
        raise HTTPException(503, detail=JOURNEYS_NOT_LOADED, headers={"Retry-After": RETRY_AFTER_S})
    return catalog.of(tenant)


async def get_producer(request: Request) -> TouchpointProducer:
    return request.app.state.producer


ProducerDep = Annotated[TouchpointProducer, Depends(get_producer)]


async def writer_context(request: Request) -> ValidationContext:
    """The caller's key must hold events:write (401/403/429 otherwise, as any /v1 route); its
    tenant (never the body's) and that tenant's journeys are what the events are validated against."""
    tenant = (await authorized(request, EVENTS_WRITE_SCOPES)).tenant
    journeys = await get_journeys(request, tenant)
    settings: Settings = request.app.state.settings
    return ValidationContext(
        tenant=tenant,
        journeys=journeys,
        now=utc_now(),
        max_event_age_s=settings.max_event_age_s,
        max_future_skew_s=settings.max_future_skew_s,
    )


async def post_event(request: Request) -> Response:
    context = await writer_context(request)
    producer: TouchpointProducer = request.app.state.producer
    _shed_if_saturated(producer)
    _require_media_type(request, {JSON})
    body = await _read_body(request, MAX_EVENT_BYTES, "a valid event is a few KiB (attributes at most 2 KiB)")
    payload = _parse_json(body)
    try:
        record = encode_event(payload, context)
    except EventInvalid as invalid:
        _count_rejected(invalid.errors)
        raise HTTPException(422, detail=[error.to_dict() for error in invalid.errors]) from None
    await _produce(producer, [record])
    return _json({"event_id": record.event_id, "status": "accepted"}, status_code=202)


async def post_batch(request: Request) -> Response:
    context = await writer_context(request)
    producer: TouchpointProducer = request.app.state.producer
    settings: Settings = request.app.state.settings
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

    # NDJSON lines that are not JSON are already EventInvalid; the others are validated together.
    validated = iter(encode_events([item for item in items if not isinstance(item, EventInvalid)], context))
    results: list[dict[str, Any]] = []
    records: list[EncodedRecord] = []
    for index, item in enumerate(items):
        outcome = item if isinstance(item, EventInvalid) else next(validated)
        if isinstance(outcome, EventInvalid):
            _count_rejected(outcome.errors)
            results.append({
                "index": index,
                "event_id": _posted_event_id(item, outcome.errors),
                "status": "rejected",
                "errors": [error.to_dict() for error in outcome.errors],
            })  # fmt: skip
        else:
            records.append(outcome)
            results.append({"index": index, "event_id": outcome.event_id, "status": "accepted"})
    if records:
        await _produce(producer, records)
    outcome = {"accepted": len(records), "rejected": len(items) - len(records), "results": results}
    return _json(outcome, status_code=202 if records else 422)


async def healthz() -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request, producer: ProducerDep) -> Response:
    reason = await producer.not_ready_reason()
    if reason is None and not request.app.state.journey_loader.catalog.loaded:
        reason = "the tenants' journey maps have not been read from the database yet"
    if reason is not None:
        return _json({"status": "unavailable", "reason": reason}, status_code=503)
    return _json({"status": "ready"})


def _json(content: Any, status_code: int = 200) -> Response:
    # orjson, as a batch's results are the largest body of the hot path. Not ORJSONResponse: FastAPI
    # 0.165 deprecates it for return-type serialization, which cannot choose the status per outcome.
    return Response(orjson.dumps(content), status_code=status_code, media_type=JSON)


async def _produce(producer: TouchpointProducer, records: list[EncodedRecord]) -> None:
    try:
        await producer.send_all(records)
    except BrokerUnavailable:
        INGEST_EVENTS.labels("failed", "broker_unavailable").inc(len(records))
        raise HTTPException(503, detail=BROKER_UNAVAILABLE, headers={"Retry-After": RETRY_AFTER_S}) from None
    except Overloaded:
        INGEST_EVENTS.labels("failed", "overloaded").inc(len(records))
        raise HTTPException(503, detail=OVERLOADED, headers={"Retry-After": RETRY_AFTER_S}) from None
    _ACCEPTED.inc(len(records))


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
    # The ASGI messages themselves, not request.stream(): an async generator per request costs more
    # than the usual body of one message. A client may omit Content-Length (chunked) or understate
    # it: count what actually arrives.
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise _body_rejected(413, f"the body is larger than {limit_bytes} bytes", too_large)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
