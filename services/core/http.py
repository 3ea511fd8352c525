"""What the HTTP services share: error bodies, request limits, security headers, timing, /metrics."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.deadlines import Deadlines
from services.core.logs import REQUEST_ID, request_id_from
from services.core.loop_lag import with_loop_lag_watch
from services.core.settings import Settings

access_log = logging.getLogger("cem.access")

# The interactive docs load Swagger UI / ReDoc from a CDN: no Content-Security-Policy there.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
CONTENT_SECURITY_POLICY = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
TIMEOUT_RETRY_AFTER_S = 1


def fastapi_telemetry() -> dict[str, bool] | None:
    """FastAPI's `telemetry` option: its native OpenTelemetry off, unless the environment sets
    OpenTelemetry up (an OTEL_* variable or FASTAPI_OTEL_AUTO_CONFIGURE). The services export
    Prometheus metrics and configure no OpenTelemetry provider, yet with the default FastAPI asks
    the three global providers on every request (~3 % of a single event's CPU: py-spy, 07:00)."""
    if any(name.startswith("OTEL_") or name == "FASTAPI_OTEL_AUTO_CONFIGURE" for name in os.environ):
        return None
    return {"tracing": False, "metrics": False, "logs": False}


def error_body(errors: list[dict]) -> dict:
    """The one 4xx body shape: FastAPI's {"detail": [...]}, each item naming its field."""
    return {"detail": errors}


def field_error(field: str, message: str, allowed=None) -> dict:
    body = {"field": field, "message": message}
    if allowed is not None:
        body["allowed"] = allowed
    return body


class FieldErrorModel(BaseModel):
    field: str
    message: str
    allowed: list[str] | str | None = None


class ErrorBody(BaseModel):
    """FastAPI's 4xx shape; every item names the field (parameter, header, body field) that was wrong."""

    detail: list[FieldErrorModel]


def _documented(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# What every /v1 route may answer because of its API key (services/core/access.py).
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _documented("No API key, not an API key, unknown or revoked (`WWW-Authenticate: Bearer`)"),
    403: _documented("The API key lacks the scope this request needs; `allowed` lists the scopes that would do"),
    429: _documented("The API key's rate limit is used up; retry after `Retry-After` s"),
}


class RequestGuard:
    """Every request's limits, deadline, response headers, timing and access log, as one plain ASGI
    layer (streams pass through). One layer, not two: each layer is a coroutine frame walked again
    at every resume of the handler, with its own send wrapper; they were most of the CPU of a
    single-event request.

    - a request target (path and query) longer than `max_path_bytes`: 414;
    - headers larger than `max_header_bytes` together: 431;
    - no response started within `timeout_s` (checked by one timer for all requests, so up to a
      tenth of it or 1 s later: services/core/deadlines.py): the handler is cancelled, 503 with
      Retry-After (a response already streaming, like the alert stream, is not cut);
    - the app's `direct_routes` (ingest's event routes) called without the framework's layers;
    - security headers and X-Request-ID on every response; `Cache-Control: no-store` unless the
      route set one;
    - with `request_duration`: the request-duration histogram and one access-log line per request
      that got past the limits, by route template (never the raw path: paths carry customer ids).
    """

    def __init__(
        self, app: ASGIApp, max_path_bytes: int, max_header_bytes: int, timeout_s: float,
        request_duration: Histogram | None = None, direct_routes: DirectRoutes | None = None,
    ) -> None:  # fmt: skip
        self.app = app
        self.direct_routes = direct_routes if direct_routes is not None else {}
        self.max_path_bytes = max_path_bytes
        self.max_header_bytes = max_header_bytes
        self.timeout_s = timeout_s
        self.deadlines = Deadlines(timeout_s)
        self.request_duration = request_duration
        # The histogram's child per (method, route, status): `labels()` checks and locks on each call.
        # Bounded like the metric itself (known methods, route templates, statuses).
        self._observers: dict[tuple[str, str, int], Callable[[float], None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = scope.get("headers", ())
        header_bytes = 4 * len(headers)
        given_id = None
        for name, value in headers:  # one pass: the size and the caller's request id
            header_bytes += len(name) + len(value)
            if name == b"x-request-id":
                given_id = value
        request_id = request_id_from(given_id)
        REQUEST_ID.set(request_id)  # every log line of this request carries it
        id_header = (b"x-request-id", request_id.encode())

        target_bytes = len(scope.get("raw_path") or path.encode()) + len(scope.get("query_string", b""))
        if target_bytes > self.max_path_bytes:
            await _refuse(send, path, id_header, 414, "(path)", f"the request target is {target_bytes} bytes",
                          f"at most {self.max_path_bytes} bytes of path and query")  # fmt: skip
            return
        if header_bytes > self.max_header_bytes:
            await _refuse(send, path, id_header, 431, "(headers)", f"the request headers are {header_bytes} bytes",
                          f"at most {self.max_header_bytes} bytes of headers")  # fmt: skip
            return

        started_s = time.perf_counter()
        status = 0  # 0: no response started yet

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                deadline.clear()  # the response is under way: its body may take its time
                message["headers"] = _response_headers(message.get("headers", ()), path, id_header)
            await send(message)

        direct = self.direct_routes.get((scope["method"], path)) if not scope.get("root_path") else None
        try:
            async with self.deadlines.within() as deadline:
                if direct is None:
                    await self.app(scope, receive, send_with_headers)
                else:
                    await _call_direct(direct, scope, receive, send_with_headers)
        except TimeoutError:
            if status or not deadline.expired():
                raise  # a TimeoutError of the handler's own, or too late to answer
            status = 503
            await _refuse(
                send, path, id_header, 503, "(request)",
                f"no response within {self.timeout_s:g} s: the request was abandoned and may or may not have "
                "taken effect; retry later (events are safe to post again with the same event ids)",
                headers=[(b"retry-after", str(TIMEOUT_RETRY_AFTER_S).encode())],
            )  # fmt: skip
        finally:
            if self.request_duration is not None:
                self._record(scope, status or 500, time.perf_counter() - started_s)

    def _record(self, scope: Scope, status: int, elapsed_s: float) -> None:
        method, route = scope["method"], _route_template(scope)
        observe = self._observers.get((method, route, status))
        if observe is None:
            assert self.request_duration is not None
            observe = self._observers[method, route, status] = self.request_duration.labels(
                method, route, str(status)
            ).observe
        observe(elapsed_s)
        if access_log.isEnabledFor(logging.INFO):
            duration_ms = elapsed_s * 1000
            # Logger.info without its search of the call stack for the caller's file and line
            # (which no log line shows): a third of the cost of a line.
            access_log.handle(access_log.makeRecord(
                access_log.name, logging.INFO, "(unknown file)", 0, "%s %s %d %.1f ms",
                (method, route, status, duration_ms), None,
                extra={"method": method, "route": route, "status": status, "duration_ms": round(duration_ms, 2)},
            ))  # fmt: skip


# (method, path) -> a route whose endpoint takes the Request alone and needs nothing from the
# framework between this layer and itself (services/ingest/routes.py: RequestOnlyRoute).
DirectRoutes = dict[tuple[str, str], Any]


async def _call_direct(route: Any, scope: Scope, receive: Receive, send: Send) -> None:
    """What Starlette's exception middleware, FastAPI's router and its request_response wrapper do
    for such a route, without their layers (two exit stacks, a matching pass over every route, a
    send wrapper each): the endpoint's response, or the app's handler's for the exception it raised
    (HTTPException: our error body); anything else goes up to the server-error layer as before."""
    scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, {}
    request = Request(scope, receive, send)
    try:
        response = await route.endpoint(request)
    except StarletteHTTPException as error:
        handler = _exception_handler(scope["app"], error)
        if handler is None:
            raise
        response = await handler(request, error)
        error.__traceback__ = None
    await response(scope, receive, send)


def _exception_handler(app: Any, error: StarletteHTTPException) -> Callable | None:
    """The handler Starlette's ExceptionMiddleware would pick: by status code, then by class."""
    handlers = app.exception_handlers
    handler = handlers.get(error.status_code)
    if handler is None:
        handler = next((handlers[cls] for cls in type(error).__mro__ if cls in handlers), None)
    return handler


async def _refuse(
    send: Send, path: str, id_header: tuple[bytes, bytes], status: int, field: str, message: str,
    allowed: str | None = None, headers: list[tuple[bytes, bytes]] | None = None,
) -> None:  # fmt: skip
    body = orjson.dumps(error_body([field_error(field, message, allowed)]))
    response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        *(headers or [])]  # fmt: skip
    await send({"type": "http.response.start", "status": status,
                "headers": _response_headers(response_headers, path, id_header)})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


_ADDED_NAMES = frozenset({*(name for name, _ in SECURITY_HEADERS), CONTENT_SECURITY_POLICY[0], b"cache-control"})
_ADDED = (*SECURITY_HEADERS, CONTENT_SECURITY_POLICY, (b"cache-control", b"no-store"))
_ADDED_TO_DOCS = (*SECURITY_HEADERS, (b"cache-control", b"no-store"))


def _response_headers(
    headers: Iterable[tuple[bytes, bytes]], path: str, id_header: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    """The response's headers, then the security headers it did not set itself, then X-Request-ID."""
    headers = list(headers)
    present = {name.lower() for name, _ in headers}
    if present.isdisjoint(_ADDED_NAMES):  # the usual case: every one of them, precomputed
        headers += _ADDED_TO_DOCS if path in DOCS_PATHS else _ADDED
    else:
        headers += [header for header in SECURITY_HEADERS if header[0] not in present]
        if path not in DOCS_PATHS and CONTENT_SECURITY_POLICY[0] not in present:
            headers.append(CONTENT_SECURITY_POLICY)
        if b"cache-control" not in present:
            headers.append((b"cache-control", b"no-store"))
    headers.append(id_header)
    return headers


def _route_template(scope: Scope) -> str:
    # Label by route template (/v1/customers/{customer_id}), never by the raw path.
    # The router leaves the matched route in the scope; prefer it, as FastAPI (0.165) keeps an
    # included APIRouter as one entry of app.router.routes, which has no path of its own.
    matched = scope.get("route")
    if isinstance(getattr(matched, "path", None), str):
        return matched.path
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "unmatched"


def install_common(app: FastAPI, request_duration: Histogram | None = None, settings: Settings | None = None) -> None:
    """Request timing, limits and security headers, CORS (closed unless origins are configured),
    FastAPI's validation errors in our field shape, GET /metrics, and the event-loop lag metric
    while the app runs (services/core/loop_lag.py)."""
    settings = settings or Settings()
    app.router.lifespan_context = with_loop_lag_watch(app.router.lifespan_context)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            max_age=600,
        )
    # Added last, so outermost: a refused request costs nothing further. The app may add its hot
    # routes to app.state.direct_routes (filled after this, read per request); not with CORS, whose
    # layer is inside this one and must see every response.
    app.state.direct_routes = {}
    app.add_middleware(
        RequestGuard,
        max_path_bytes=settings.max_path_bytes,
        max_header_bytes=settings.max_header_bytes,
        timeout_s=settings.request_timeout_s,
        request_duration=request_duration,
        direct_routes=None if settings.cors_origin_list else app.state.direct_routes,
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        # Our own 4xx carry field errors already; FastAPI's and the router's (a body that cannot be
        # parsed, an unknown path, a wrong method) carry a string: the same shape for those too.
        detail = error.detail
        if 400 <= error.status_code < 500 and not isinstance(detail, list):
            field = "(body)" if "body" in str(detail).lower() else "(request)"
            message = str(detail)
            if error.status_code == 404 and detail == "Not Found":
                message = f"no resource at {request.url.path}"
            elif error.status_code == 405:
                message = f"method {request.method} is not allowed at {request.url.path}"
            detail = [field_error(field, message)]
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)

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
