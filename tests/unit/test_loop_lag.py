"""cem_event_loop_lag_seconds (services/core/loop_lag.py): a stalled event loop shows as lag,
and every app with install_common measures it while it runs."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI

from services.core.http import install_common
from services.core.loop_lag import watch_loop_lag
from services.core.metrics import EVENT_LOOP_LAG
from services.core.settings import Settings


async def test_a_blocked_loop_shows_as_lag_and_an_idle_one_does_not():
    observed: list[float] = []
    watching = asyncio.create_task(watch_loop_lag(observed.append, interval_s=0.01))
    await asyncio.sleep(0.1)
    idle = list(observed)
    time.sleep(0.2)  # a blocking call on the loop's thread
    await asyncio.sleep(0.05)
    watching.cancel()
    assert len(idle) >= 3 and max(idle) < 0.05
    assert 0.15 < max(observed) < 1.0


def _lag_count() -> float:
    return next(
        sample.value for metric in EVENT_LOOP_LAG.collect() for sample in metric.samples
        if sample.name == "cem_event_loop_lag_seconds_count"
    )  # fmt: skip


async def test_every_app_with_install_common_watches_its_loop_while_it_runs():
    started = []

    async def lifespan(app):
        started.append(True)
        yield {"answer": 42}

    app = FastAPI(lifespan=lifespan)
    install_common(app, settings=Settings(auth_disabled=True))
    before = _lag_count()
    async with app.router.lifespan_context(app) as state:
        assert state == {"answer": 42} and started  # the app's own lifespan still runs
        await asyncio.sleep(0.2)
    assert _lag_count() >= before + 2
    count = _lag_count()
    await asyncio.sleep(0.15)
    assert _lag_count() == count  # stopped with the app
