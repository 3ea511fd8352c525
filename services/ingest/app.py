"""The ingest service's FastAPI app: journeys loaded once, the producer run in the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from services.core.access import install_access
from services.core.http import fastapi_telemetry, install_common
from services.core.db.engine import create_engine
from services.core.db.journeys import JourneyLoader
from services.core.metrics import INGEST_REQUEST_DURATION
from services.core.settings import Settings
from services.ingest.producer import TouchpointProducer
from services.ingest.routes import add_routes, direct_routes


def create_app(settings: Settings) -> FastAPI:
    # Loaded here, not per request: a broken journey map stops the service before it listens.
    loader = JourneyLoader.shipped(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        producer = TouchpointProducer(settings)
        app.state.producer = producer
        # Connecting in the background lets the service start (and report 503) while the broker is down.
        connecting = asyncio.create_task(producer.run(), name="ingest-producer")
        # One small pool for the key lookups and the tenants' journey maps (re-read every
        # journeys_refresh_s; the last ones are kept through a database outage).
        engine = create_engine(settings.database_url, pool_size=2)
        if app.state.access.resolver is not None:
            app.state.access.resolver.use_engine(engine)
        await loader.load_at_start(engine)
        refreshing = asyncio.create_task(loader.keep_fresh(engine), name="journey-maps")
        try:
            yield
        finally:
            for task in (connecting, refreshing):
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            await engine.dispose()
            await producer.close()
            await app.state.access.close()

    app = FastAPI(
        title="CEM ingest", version="1", summary="Touchpoint events in (SPEC 4)", lifespan=lifespan,
        telemetry=fastapi_telemetry(),
    )  # fmt: skip
    app.state.settings = settings
    app.state.journey_loader = loader
    # API keys (their lookups use Postgres); refuses CEM_AUTH_DISABLED off loopback.
    install_access(app, settings)
    install_common(app, INGEST_REQUEST_DURATION, settings)
    add_routes(app.router)
    app.state.direct_routes.update(direct_routes(app.router))
    return app
