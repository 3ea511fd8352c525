"""The scoring process: the consumer loop plus a small HTTP server for health and /metrics."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from services.core.db.engine import create_engine
from services.core.http import fastapi_telemetry, install_common
from services.core.db.journeys import JourneyLoader
from services.core.settings import Settings
from services.scoring.alerts import AlertEvaluator, keep_stage_alerts_fresh
from services.scoring.consumer import Scorer
from services.scoring.gauges import keep_gauges_fresh
from services.scoring.retention import keep_dedup_ledger_trimmed
from services.scoring.sweep import keep_quadrants_fresh
from services.scoring.relay import KafkaAlerts, WebhookAlerts, kafka_relay_name, run_relay, webhook_relay_name

log = logging.getLogger("cem.scoring")


def create_app(settings: Settings) -> FastAPI:
    journeys = JourneyLoader.shipped(settings)  # fails at start on a broken shipped map

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # A connection per consumer's batch, and a few for the timers below.
        engine = create_engine(settings.database_url, pool_size=settings.scoring_consumers + 4)
        # Several group members in one process: while one waits for Postgres to commit its batch,
        # another's Python work runs (docs/performance.md). Each owns its partitions and offsets.
        scorers = [Scorer(settings, engine, journeys, name=f"consumer-{i}") for i in range(settings.scoring_consumers)]
        # Alerts are judged in each batch's transaction, by the journeys the scorers score with.
        context = scorers[0].context
        alerts = AlertEvaluator(context, settings.alert_stage_window_minutes)
        for scorer in scorers:
            scorer.after_batch = alerts
        tasks = [asyncio.create_task(scorer.run(), name=f"scoring-{scorer.name}") for scorer in scorers]
        kafka_alerts = KafkaAlerts(settings)
        webhook = WebhookAlerts(settings) if settings.alert_webhook_url else None
        helpers = [
            asyncio.create_task(keep_gauges_fresh(engine, settings), name="domain-gauges"),
            # The tenants' journey maps, re-read every journeys_refresh_s, for the batches and the timers.
            asyncio.create_task(journeys.keep_fresh(engine), name="journey-maps"),
            asyncio.create_task(
                keep_stage_alerts_fresh(
                    engine, context, settings.alert_stage_window_minutes, settings.alert_reevaluate_interval_s
                ),
                name="stage-alert-timer",
            ),
            asyncio.create_task(
                run_relay(engine, kafka_relay_name(settings), kafka_alerts, interval_s=settings.alert_relay_interval_s),
                name="alert-relay-kafka",
            ),
            asyncio.create_task(
                keep_quadrants_fresh(engine, context, alerts, settings.quadrant_sweep_interval_s),
                name="quadrant-sweep",
            ),
            # Deletes processed_events rows no copy of their event can need any more (retention.py).
            asyncio.create_task(keep_dedup_ledger_trimmed(engine, settings), name="dedup-retention"),
        ]
        if webhook is not None:
            helpers.append(
                asyncio.create_task(
                    run_relay(
                        engine,
                        webhook_relay_name(settings.alert_webhook_url),
                        webhook,
                        interval_s=settings.alert_relay_interval_s,
                        start_at_end=True,
                    ),
                    name="alert-relay-webhook",
                )
            )
        app.state.scorers, app.state.engine, app.state.tasks = scorers, engine, tasks
        try:
            yield
        finally:
            # SIGTERM: let the in-flight batches commit, then leave the group.
            for scorer in scorers:
                scorer.stop()
            try:
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            # Transitions not yet relayed stay in the log: the next relay leader delivers them.
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await kafka_alerts.close()
            if webhook is not None:
                await webhook.close()
            await engine.dispose()

    app = FastAPI(
        title="CEM scoring", lifespan=lifespan, default_response_class=JSONResponse, telemetry=fastapi_telemetry()
    )
    install_common(app, settings=settings)

    @app.get("/healthz")
    async def healthz() -> dict:
        for scorer, task in zip(app.state.scorers, app.state.tasks):
            if task.done():
                reason = repr(task.exception()) if not task.cancelled() and task.exception() else "stopped"
                return JSONResponse(
                    {"status": "down", "reason": f"{scorer.name} loop ended: {reason}"}, status_code=503
                )
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        scorers: list[Scorer] = app.state.scorers
        reasons = []
        for scorer in scorers:
            if not scorer.running:
                reasons.append(f"{scorer.name}: {scorer.last_error or 'consumer not started'}")
            elif scorer.last_error:
                reasons.append(f"{scorer.name}: {scorer.last_error}")
        try:
            async with app.state.engine.connect() as conn:
                await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=2)
        except Exception as error:
            reasons.append(f"database unreachable: {str(error)[:200]}")
        if reasons:
            return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
        partitions = sorted(tp.partition for scorer in scorers for tp in scorer.stored_offsets)
        return {"status": "ready", "assigned_partitions": partitions}

    return app
