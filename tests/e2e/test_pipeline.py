"""Through the whole stack: HTTP into ingest, the real broker, scoring into the real Postgres,
HTTP out of the query API. Figures are checked against a computation made in the test."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from services.api.app import create_app as create_api
from services.core.embedded import free_port
from services.core.journeys import load_journeys
from services.core.settings import REPO_ROOT
from services.ingest.app import create_app as create_ingest
from services.scoring.app import create_app as create_scoring

pytestmark = pytest.mark.integration


@asynccontextmanager
async def running(app):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


@asynccontextmanager
async def stack(settings):
    async with AsyncExitStack() as stack:
        scoring = await stack.enter_async_context(running(create_scoring(settings)))
        ingest = await stack.enter_async_context(running(create_ingest(settings)))
        api = await stack.enter_async_context(running(create_api(settings)))
        yield ingest, api, scoring


async def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.2):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval_s)


async def wait_ingest_ready(ingest: httpx.AsyncClient) -> None:
    async def ready():
        return (await ingest.get("/readyz")).status_code == 200

    await wait_until(ready)


def make_events(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    events = []
    for number in range(count):
        scale = rng.choice([None, {"min": 1, "max": 5}])
        low, high = (0, 10) if scale is None else (1, 5)
        event = {
            "event_id": f"e2e-{seed}-{number}",
            "occurred_at": (now - timedelta(minutes=rng.uniform(0, 50))).isoformat(),
            "customer_id": f"c{rng.randrange(15)}",
            "journey": "car-rental",
            "stage": rng.choice(["reservation", "pickup", "return"]),
            "channel": rng.choice(["app", "web"]),
            "experience": round(rng.uniform(low, high), 1),
            "emotion": rng.choice(["angry", "pleased", "neutral"]),
            "revenue": rng.choice([0, 100, 900]),
        }
        if scale:
            event["scale"] = scale
        if rng.random() < 0.5:
            event["expectation"] = round(rng.uniform(low, high), 1)
        events.append(event)
    return events


def normalised(event: dict, promise: float) -> tuple[float, float]:
    scale = event.get("scale") or {"min": 0, "max": 10}

    def to_ten(value):
        return (value - scale["min"]) / (scale["max"] - scale["min"]) * 10

    experience = to_ten(event["experience"])
    expectation = to_ten(event["expectation"]) if "expectation" in event else promise
    return experience, expectation


async def test_posted_events_are_scored_once_and_read_back_with_the_right_figures(settings):
    journeys = load_journeys(settings.journeys_dir)
    promises = {stage.id: stage.promise for stage in journeys["car-rental"].stages}
    events = make_events(300, seed=11)
    invalid = [
        {**events[0], "event_id": "bad-1", "stage": "pikcup"},
        {**events[1], "event_id": "bad-2", "experience": 42},
        {**events[2], "event_id": "bad-3", "colour": "red"},
    ]
    async with stack(settings) as (ingest, api, _):
        await wait_ingest_ready(ingest)
        response = await ingest.post("/v1/events:batch", json={"events": events[:200] + invalid})
        assert response.status_code == 202, response.text
        body = response.json()
        assert (body["accepted"], body["rejected"]) == (200, 3)
        rejected = [result for result in body["results"] if result["status"] == "rejected"]
        assert [error["field"] for result in rejected for error in result["errors"]] == ["stage", "experience", "colour"]
        # The rest one by one, then everything again: retries and duplicates count once.
        for event in events[200:]:
            assert (await ingest.post("/v1/events", json=event)).status_code == 202
        assert (await ingest.post("/v1/events:batch", json={"events": events[:150]})).status_code == 202

        async def all_scored():
            listing = (await api.get("/v1/journeys/car-rental/stages", params={"window": "1h"})).json()
            return listing if sum(row["events"] for row in listing["stages"]) == len(events) else None

        listing = await wait_until(all_scored)
        await asyncio.sleep(1.0)  # a late duplicate would show up now
        listing = (await api.get("/v1/journeys/car-rental/stages", params={"window": "1h"})).json()
        rows = {row["stage"]: row for row in listing["stages"]}
        for stage in ("reservation", "pickup", "return"):
            mine = [event for event in events if event["stage"] == stage]
            pairs = [normalised(event, promises[stage]) for event in mine]
            gaps = [experience - expectation for experience, expectation in pairs]
            row = rows[stage]
            assert row["events"] == len(mine)
            assert math.isclose(row["mean_gap"], sum(gaps) / len(gaps), abs_tol=1e-9)
            assert math.isclose(row["shortfall_rate"], sum(gap < 0 for gap in gaps) / len(gaps))
            kept = sum(experience >= promises[stage] for experience, _ in pairs)
            assert math.isclose(row["promise_kept_rate"], kept / len(mine))
            negative = sum(event["emotion"] == "angry" for event in mine)
            assert math.isclose(row["negative_emotion_rate"], negative / len(mine))
            assert math.isclose(row["revenue"], sum(event["revenue"] for event in mine))
        assert rows["billing"]["events"] == 0

        customer = (await api.get("/v1/customers/c3")).json()
        mine = [event for event in events if event["customer_id"] == "c3"]
        assert customer["event_count"] == len(mine)
        assert (await api.get("/v1/customers/never-seen")).status_code == 404


@pytest.mark.timeout(180)
def test_cem_dev_starts_the_stack_and_scores_a_posted_event(tmp_path):
    """The README's first command, as a user runs it (without --simulate, on free ports)."""
    ports = {name: free_port() for name in ("api", "ingest", "scoring")}
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("CEM_")},
        "CEM_API_PORT": str(ports["api"]),
        "CEM_INGEST_PORT": str(ports["ingest"]),
        "CEM_SCORING_PORT": str(ports["scoring"]),
        "CEM_SCORING_REBALANCE_TIMEOUT_MS": "1000",
        "CEM_RATE_LIMIT_PER_S": "0",  # as docs/performance.md says to, for bench.outside below
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "dev", "--data-dir", str(tmp_path / "data")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if "The stack is up" in line:
                break
        else:
            raise AssertionError("cem dev exited:\n" + "".join(output))
        # Keep draining the pipe, or the services block once it is full.
        threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
        # The key `cem dev` prints with the URLs (admin, for CEM_TENANT), as a user copies it.
        deadline = datetime.now() + timedelta(seconds=10)
        while not any("export CEM_KEY=" in line for line in output) and datetime.now() < deadline:
            time.sleep(0.1)
        (key,) = [line.split("CEM_KEY=", 1)[1].strip() for line in output if "export CEM_KEY=" in line]
        auth = {"Authorization": f"Bearer {key}"}
        unauthenticated = httpx.get(f"http://127.0.0.1:{ports['api']}/v1/customers/smoke", timeout=5)
        assert unauthenticated.status_code == 401, unauthenticated.text
        event = {
            "event_id": "dev-smoke-1",
            "occurred_at": datetime.now(timezone.utc).isoformat(),
            "customer_id": "smoke",
            "journey": "hotel",
            "stage": "check-in",
            "experience": 3,
            "revenue": 5000,
        }
        response = httpx.post(f"http://127.0.0.1:{ports['ingest']}/v1/events", json=event, headers=auth, timeout=10)
        assert response.status_code == 202, response.text
        deadline = datetime.now() + timedelta(seconds=60)
        while datetime.now() < deadline:
            customer = httpx.get(f"http://127.0.0.1:{ports['api']}/v1/customers/smoke", headers=auth, timeout=5)
            if customer.status_code == 200:
                break
            time.sleep(0.3)
        assert customer.status_code == 200, customer.text
        assert customer.json()["quadrant"] == "at_risk"

        # The benchmark's figures from outside (bench/outside.py), briefly: every phase runs and
        # gives a figure, and scoring counts every event accepted (or the tool raises).
        figures_file = tmp_path / "outside.json"
        outside = subprocess.run(
            [
                sys.executable, "-m", "bench.outside", "--key", key, "--seconds", "1", "--burst", "1000",
                "--out", str(figures_file),
                *(f"--{name}=http://127.0.0.1:{port}" for name, port in ports.items()),
            ],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        )  # fmt: skip
        assert outside.returncode == 0, outside.stdout + outside.stderr
        figures = json.loads(figures_file.read_text())["figures"]
        assert len(figures) == 20 and all(value is not None for value in figures.values()), figures
        assert all(figures[name] > 0 for name in figures if not name.startswith("outside_scoring_caught_up")), figures
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError("cem dev did not stop within 60 s of Ctrl-C:\n" + "".join(output)) from None
    assert process.returncode == 0
