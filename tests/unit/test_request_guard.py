"""The one ASGI layer around every request (services/core/http.py RequestGuard): headers, request
ids, timing and the access log; and ingest's RequestOnlyRoute (services/ingest/routes.py)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Response, Security
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from services.core.access import bearer_scheme
from services.core.http import (
    CONTENT_SECURITY_POLICY, DOCS_PATHS, SECURITY_HEADERS, _response_headers, install_common,
)  # fmt: skip
from services.core.settings import Settings
from services.ingest.routes import RequestOnlyRoute

ID = (b"x-request-id", b"trace-1")


def reference_headers(headers: list[tuple[bytes, bytes]], path: str) -> list[tuple[bytes, bytes]]:
    """The headers as the guard added them before its fast path (each missing one, in this order)."""
    present = {name.lower() for name, _ in headers}
    added = [header for header in SECURITY_HEADERS if header[0] not in present]
    if path not in DOCS_PATHS and CONTENT_SECURITY_POLICY[0] not in present:
        added.append(CONTENT_SECURITY_POLICY)
    if b"cache-control" not in present:
        added.append((b"cache-control", b"no-store"))
    return headers + added + [ID]


NAMES = st.sampled_from([b"content-type", b"Cache-Control", b"cache-control", b"x-frame-options",
                         b"X-Content-Type-Options", b"content-security-policy", b"referrer-policy", b"etag"])  # fmt: skip


@given(
    headers=st.lists(st.tuples(NAMES, st.binary(max_size=8)), max_size=6),
    path=st.sampled_from(["/v1/events", "/docs", "/redoc", "/metrics"]),
)
def test_response_headers_add_what_the_route_did_not_set_as_before(headers, path):
    assert _response_headers(tuple(headers), path, ID) == reference_headers(list(headers), path)


def timed_app(**settings) -> tuple[FastAPI, Histogram]:
    duration = Histogram("t_request_duration_seconds", "test", ["method", "route", "status"],
                         registry=CollectorRegistry())  # fmt: skip
    app = FastAPI()
    install_common(app, duration, Settings(**settings))

    @app.get("/v1/items/{item_id}")
    async def item(item_id: str) -> dict:
        logging.getLogger("cem.test").info("inside the handler")
        return {"id": item_id}

    @app.get("/v1/slow")
    async def slow() -> dict:
        await asyncio.sleep(5)
        return {}

    return app, duration


async def call(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path, **kwargs)


async def test_one_access_line_and_one_observation_per_request_by_route_template(caplog):
    app, duration = timed_app(request_timeout_s=0.2)
    with caplog.at_level(logging.INFO):
        ok = await call(app, "GET", "/v1/items/jane.doe", headers={"X-Request-ID": "trace-7"})
        missing = await call(app, "GET", "/v1/nowhere")
        late = await call(app, "GET", "/v1/slow")
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-7"
    assert missing.status_code == 404 and len(missing.headers["x-request-id"]) == 32
    assert late.status_code == 503 and late.headers["x-request-id"]
    access = [(record.route, record.status) for record in caplog.records if record.name == "cem.access"]
    # The timed-out request is logged as what it got, 503 (not the 500 of a cancelled handler).
    assert access == [("/v1/items/{item_id}", 200), ("unmatched", 404), ("/v1/slow", 503)]
    handler_line = next(record for record in caplog.records if record.name == "cem.test")
    assert handler_line.request_id == "trace-7"
    assert all("jane.doe" not in record.getMessage() for record in caplog.records if record.name.startswith("cem."))
    for route, status in [("/v1/items/{item_id}", "200"), ("unmatched", "404"), ("/v1/slow", "503")]:
        labels = {"method": "GET", "route": route, "status": status}
        assert duration.collect()[0].samples and _count(duration, labels) == 1


def _count(histogram: Histogram, labels: dict[str, str]) -> float:
    return next(sample.value for sample in histogram.collect()[0].samples
                if sample.name.endswith("_count") and sample.labels == labels)  # fmt: skip


async def test_refused_requests_carry_the_request_id_and_are_not_timed(caplog):
    app, duration = timed_app(max_path_bytes=64)
    with caplog.at_level(logging.INFO, logger="cem.access"):
        refused = await call(app, "GET", "/v1/" + "a" * 100, headers={"X-Request-ID": "trace-8"})
    assert refused.status_code == 414 and refused.headers["x-request-id"] == "trace-8"
    assert refused.headers["cache-control"] == "no-store"
    assert not [record for record in caplog.records if record.name == "cem.access"]


async def scheme_only(request: Request) -> Response:
    return Response(b"{}", media_type="application/json")


async def with_parameter(request: Request, limit: int = 1) -> Response:
    return Response(b"{}")


async def some_dependency() -> int:
    return 1


def test_a_request_only_route_takes_the_request_alone_and_security_schemes_only():
    router = APIRouter()
    router.add_api_route("/ok", scheme_only, methods=["POST"], route_class_override=RequestOnlyRoute,
                         dependencies=[Security(bearer_scheme, scopes=["events:write"])])  # fmt: skip
    with pytest.raises(TypeError):
        router.add_api_route("/param", with_parameter, methods=["POST"], route_class_override=RequestOnlyRoute)
    with pytest.raises(TypeError):  # a dependency that would silently not run
        router.add_api_route("/dep", scheme_only, methods=["POST"], route_class_override=RequestOnlyRoute,
                             dependencies=[Depends(some_dependency)])  # fmt: skip
