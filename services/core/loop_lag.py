"""cem_event_loop_lag_seconds, in every service: how late the event loop runs a timer. A task
sleeps a fixed short interval and records by how much it overslept: the time during which the
loop was running other callbacks or was stalled (a blocking call, a long collection, CPU taken
by others). A request's latency spike with no lag is then outside the loop (the broker, the
database); with lag, inside it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from services.core.metrics import EVENT_LOOP_LAG

LAG_INTERVAL_S = 0.05  # 20 samples a second: a stall of a few ms shows, at no measurable cost


async def watch_loop_lag(
    observe: Callable[[float], None] = EVENT_LOOP_LAG.observe, interval_s: float = LAG_INTERVAL_S
) -> None:
    clock = time.perf_counter  # not loop.time(): uvloop's is the time of the iteration, in ms
    while True:
        started = clock()
        await asyncio.sleep(interval_s)
        observe(max(0.0, clock() - started - interval_s))


def with_loop_lag_watch(lifespan_context: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An app's lifespan that also runs `watch_loop_lag` while the app is up."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        watching = asyncio.create_task(watch_loop_lag(), name="loop-lag")
        try:
            async with lifespan_context(app) as state:
                yield state
        finally:
            watching.cancel()
            with suppress(asyncio.CancelledError):
                await watching

    return lifespan
