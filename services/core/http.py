"""What the HTTP services share: error bodies, request timing, /metrics."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from starlette.routing import Match


def error_body(errors: list[dict]) -> dict:
    """The one 4xx body shape: FastAPI's {"detail": [...]}, each item naming its field."""
    return {"detail": errors}


def field_error(field: str, message: str, allowed=None) -> dict:
    body = {"field": field, "message": message}
    if allowed is not None:
        body["allowed"] = allowed
    return body


def _route_template(request: Request) -> str:
    # Label by route template (/v1/customers/{customer_id}), never by the raw path.
    # The router leaves the matched route in the scope; prefer it, as FastAPI (0.165) keeps an
    # included APIRouter as one entry of app.router.routes, which has no path of its own.
    matched = request.scope.get("route")
    if isinstance(getattr(matched, "path", None), str):
        return matched.path
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "unmatched"


def install_common(app: FastAPI, request_duration: Histogram | None = None) -> None:
    """Request timing, FastAPI's validation errors in our field shape, and GET /metrics."""
    if request_duration is not None:

        @app.middleware("http")
        async def time_requests(request: Request, call_next):
            started = time.perf_counter()
            status = 500
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                request_duration.labels(request.method, _route_template(request), str(status)).observe(
                    time.perf_counter() - started
                )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = []
        for detail in error.errors():
            location = [str(part) for part in detail.get("loc", ()) if part not in ("body", "query", "path")]
            errors.append(field_error(".".join(location) or "(request)", detail.get("msg", "invalid")))
        return JSONResponse(error_body(errors), status_code=422)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
