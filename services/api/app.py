"""The query API (SPEC 6): the FastAPI factory, its lifespan, and the health endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from services.api import admin, alerts, customers, journeys, positioning
from services.api.deps import EngineDep
from services.api.errors import DATABASE_RETRY_AFTER_S, install_error_handlers
from services.core.access import install_access
from services.core.db.engine import create_engine
from services.core.http import fastapi_telemetry, install_common
from services.core.db.journeys import JourneyLoader
from services.core.metrics import API_REQUEST_DURATION
from services.core.settings import Settings

READY_TIMEOUT_S = 2.0

DESCRIPTION = """\
Live customer-experience figures: the expectation gap per journey stage and touchpoint, each
customer's experience index, revenue and positioning-map quadrant; alerts on at-risk customers,
hot events and failing stages, as a list and as a live stream (Server-Sent Events).

Every `/v1` request carries an API key, `Authorization: Bearer cem_<prefix>_<secret>`
(`cem keys create`); its tenant scopes every answer. Reads need the scope `scores:read`,
acknowledging and resolving alerts `alerts:write`; `admin` holds every scope.

Errors are `{"detail": [{"field", "message", "allowed"?}]}`: 404 and 422 name the parameter;
401, 403 and 429 (with `Retry-After`) name `authorization`; 503 (with `Retry-After`) means the
database is unreachable and the request may be retried.
"""


class Health(BaseModel):
    status: str
    reason: str | None = None


def create_app(settings: Settings) -> FastAPI:
    loader = JourneyLoader.shipped(settings)  # a broken shipped map fails at start, not at the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = create_engine(settings.database_url)
        if app.state.access.resolver is not None:
            app.state.access.resolver.use_engine(app.state.engine)  # key lookups share the pool
        await loader.load_at_start(app.state.engine)
        refreshing = asyncio.create_task(loader.keep_fresh(app.state.engine), name="journey-maps")
        try:
            yield
        finally:
            refreshing.cancel()
            with suppress(asyncio.CancelledError):
                await refreshing
            await app.state.access.close()
            await app.state.engine.dispose()

    app = FastAPI(
        title="CEM query API", version="1", description=DESCRIPTION, lifespan=lifespan, telemetry=fastapi_telemetry()
    )
    app.state.settings = settings
    app.state.journey_loader = loader
    install_access(app, settings)  # API keys; refuses CEM_AUTH_DISABLED off loopback
    install_common(app, API_REQUEST_DURATION, settings)
    install_error_handlers(app)
    app.include_router(customers.router)
    app.include_router(journeys.router)
    app.include_router(positioning.router)
    app.include_router(alerts.router)
    app.include_router(admin.router)

    @app.get("/healthz", summary="The process is up", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        summary="The database answers (SELECT 1 within 2 s)",
        response_model=Health,
        responses={503: {"model": Health, "description": "Not ready; `reason` says why"}},
        tags=["health"],
    )
    async def readyz(engine: EngineDep) -> Health | JSONResponse:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                async with engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        except TimeoutError:
            reason = f"database did not answer within {READY_TIMEOUT_S:g} s"
        except Exception as error:  # noqa: BLE001 - any failure means not ready; say which
            reason = f"database unreachable: {type(error).__name__}: {error}".strip()
        else:
            return Health(status="ready")
        return JSONResponse(
            Health(status="unavailable", reason=reason).model_dump(),
            status_code=503,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )

    return app
