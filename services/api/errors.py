"""The API's error responses: bad input (4xx) and an unreachable database (503), as field errors."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from services.core.http import ErrorBody, error_body, field_error

DATABASE_RETRY_AFTER_S = 2


class ApiError(Exception):
    """A request the API refuses: rendered as {"detail": [{field, message, allowed?}]}."""

    def __init__(self, status_code: int, field: str, message: str, allowed: list[str] | str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.errors = [field_error(field, message, allowed)]


class NotFound(ApiError):
    def __init__(self, field: str, message: str, allowed: list[str] | str | None = None):
        super().__init__(404, field, message, allowed)


class InvalidParameter(ApiError):
    def __init__(self, field: str, message: str, allowed: list[str] | str | None = None):
        super().__init__(422, field, message, allowed)


class InvalidBody(ApiError):
    """A body that breaks several rules at once: one item per (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]], allowed: str):
        super().__init__(422, f"body.{problems[0][0]}", problems[0][1], allowed)
        self.errors = [field_error(f"body.{path}", message, allowed) for path, message in problems]


class PreconditionFailed(ApiError):
    def __init__(self, field: str, message: str, allowed: list[str] | str | None = None):
        super().__init__(412, field, message, allowed)


class NotReady(ApiError):
    """The database has not answered since the process started: tenant data cannot be known yet."""

    def __init__(self, field: str, message: str):
        super().__init__(503, field, message)


class Conflict(ApiError):
    """The request is well-formed but the resource's state does not allow it; the message says why."""

    def __init__(self, field: str, message: str, allowed: list[str] | str | None = None):
        super().__init__(409, field, message, allowed)


NOT_FOUND = {404: {"model": ErrorBody, "description": "Not found; `detail` names the parameter"}}
INVALID = {422: {"model": ErrorBody, "description": "Invalid parameter; `detail` names it and says what is allowed"}}
PRECONDITION_FAILED = {412: {"model": ErrorBody, "description": "`If-Match` names an older version; says the current one"}}
CONFLICT = {409: {"model": ErrorBody, "description": "Not allowed in the resource's current state; says why"}}
UNAVAILABLE = {503: {"model": ErrorBody, "description": "The database is unreachable; retry after `Retry-After` s"}}

# Transient database failures: the pool cannot connect, the connection broke, the connect timed out.
# Anything else (a bug in a query) stays a 500.
TRANSIENT_DATABASE_ERRORS = (OperationalError, InterfaceError, OSError, TimeoutError)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(DATABASE_RETRY_AFTER_S)} if error.status_code == 503 else None
        return JSONResponse(error_body(error.errors), status_code=error.status_code, headers=headers)

    async def database_unavailable(request: Request, error: Exception) -> JSONResponse:
        message = f"database unavailable ({type(error).__name__}); retry later"
        return JSONResponse(
            error_body([field_error("(database)", message)]),
            status_code=503,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )

    for error_class in TRANSIENT_DATABASE_ERRORS:
        app.add_exception_handler(error_class, database_unavailable)
