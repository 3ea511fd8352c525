"""The ingest service's FastAPI app: journeys loaded once, the producer run in the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from services.core.access import install_access
from services.core.http import install_common
from services.core.journeys import load_journeys
from services.core.metrics import INGEST_REQUEST_DURATION
from services.core.settings import Settings
from services.ingest.producer import TouchpointProducer
from services.ingest.routes import router


def create_app(settings: Settings) -> FastAPI:
    # Loaded here, not per request: a broken journey map stops the service before it listens.
    journeys = load_journeys(settings.journeys_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        producer = TouchpointProducer(settings)
        app.state.producer = producer
        # Connecting in the background lets the service start (and report 503) while the broker is down.
        connecting = asyncio.create_task(producer.run(), name="ingest-producer")
        try:
            yield
        finally:
            connecting.cancel()
            with suppress(asyncio.CancelledError):
                await connecting
            await producer.close()
            await app.state.access.close()

    app = FastAPI(title="CEM ingest", version="1", summary="Touchpoint events in (SPEC 4)", lifespan=lifespan)
    app.state.settings = settings
    app.state.journeys = journeys
    # API keys (their lookups use Postgres); refuses CEM_AUTH_DISABLED off loopback.
    install_access(app, settings)
    install_common(app, INGEST_REQUEST_DURATION, settings)
    app.include_router(router)
    return app
