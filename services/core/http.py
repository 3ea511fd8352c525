"""What the HTTP services share: error bodies, request limits, security headers, timing, /metrics."""

from __future__ import annotations

import asyncio
import logging
import time
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

from services.core.logs import REQUEST_ID, request_id_from
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
    """Every request's limits and every response's headers, as plain ASGI (streams pass through):

    - a request target (path and query) longer than `max_path_bytes`: 414;
    - headers larger than `max_header_bytes` together: 431;
    - no response started within `timeout_s`: the handler is cancelled, 503 with Retry-After (a
      response already streaming, like the alert stream, is not cut);
    - security headers on every response; `Cache-Control: no-store` unless the route set one.
    """

    def __init__(self, app: ASGIApp, max_path_bytes: int, max_header_bytes: int, timeout_s: float):
        self.app = app
        self.max_path_bytes = max_path_bytes
        self.max_header_bytes = max_header_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        target_bytes = len(scope.get("raw_path") or path.encode()) + len(scope.get("query_string", b""))
        if target_bytes > self.max_path_bytes:
            await self._refuse(send, path, 414, "(path)", f"the request target is {target_bytes} bytes",
                               f"at most {self.max_path_bytes} bytes of path and query")  # fmt: skip
            return
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if header_bytes > self.max_header_bytes:
            await self._refuse(send, path, 431, "(headers)", f"the request headers are {header_bytes} bytes",
                               f"at most {self.max_header_bytes} bytes of headers")  # fmt: skip
            return

        started = False
        request_id = request_id_from(dict(scope.get("headers", ())).get(b"x-request-id"))
        REQUEST_ID.set(request_id)  # every log line of this request carries it

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                deadline.reschedule(None)  # the response is under way: its body may take its time
                headers = _with_security_headers(list(message.get("headers", ())), path)
                message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            async with asyncio.timeout(self.timeout_s) as deadline:
                await self.app(scope, receive, send_with_headers)
        except TimeoutError:
            if started or not deadline.expired():
                raise  # a TimeoutError of the handler's own, or too late to answer
            await self._refuse(
                send, path, 503, "(request)",
                f"no response within {self.timeout_s:g} s: the request was abandoned and may or may not have "
                "taken effect; retry later (events are safe to post again with the same event ids)",
                headers=[(b"retry-after", str(TIMEOUT_RETRY_AFTER_S).encode())],
            )  # fmt: skip

    @staticmethod
    async def _refuse(
        send: Send, path: str, status: int, field: str, message: str, allowed: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:  # fmt: skip
        body = orjson.dumps(error_body([field_error(field, message, allowed)]))
        response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]  # fmt: skip
        await send({"type": "http.response.start", "status": status,
                    "headers": _with_security_headers(response_headers, path)})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def _with_security_headers(headers: list[tuple[bytes, bytes]], path: str) -> list[tuple[bytes, bytes]]:
    present = {name.lower() for name, _ in headers}
    added = [header for header in SECURITY_HEADERS if header[0] not in present]
    if path not in DOCS_PATHS and CONTENT_SECURITY_POLICY[0] not in present:
        added.append(CONTENT_SECURITY_POLICY)
    if b"cache-control" not in present:
        added.append((b"cache-control", b"no-store"))
    return headers + added


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


class RequestTimer:
    """The request-duration histogram and the access log, by route template.

    Plain ASGI: the `@app.middleware("http")` form runs each request through an extra task and
    stream, which profiling showed as most of the CPU of a single-event request.
    """

    def __init__(self, app: ASGIApp, request_duration: Histogram):
        self.app = app
        self.request_duration = request_duration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            route, elapsed_s, method = _route_template(scope), time.perf_counter() - started, scope["method"]
            self.request_duration.labels(method, route, str(status)).observe(elapsed_s)
            # The route template, never the raw path: paths carry customer ids.
            access_log.info(
                "%s %s %d %.1f ms", method, route, status, elapsed_s * 1000,
                extra={"method": method, "route": route, "status": status, "duration_ms": round(elapsed_s * 1000, 2)},
            )  # fmt: skip


def install_common(app: FastAPI, request_duration: Histogram | None = None, settings: Settings | None = None) -> None:
    """Request timing, limits and security headers, CORS (closed unless origins are configured),
    FastAPI's validation errors in our field shape, and GET /metrics."""
    settings = settings or Settings()
    if request_duration is not None:
        app.add_middleware(RequestTimer, request_duration=request_duration)

    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            max_age=600,
        )
    # Added last, so outermost: a refused request costs nothing further.
    app.add_middleware(
        RequestGuard,
        max_path_bytes=settings.max_path_bytes,
        max_header_bytes=settings.max_header_bytes,
        timeout_s=settings.request_timeout_s,
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
