"""Fault-injection helpers: the scoring service as a real OS process, events streamed while faults
happen, and the figures (sent, faults, lost, double counted) each fault test reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.embedded import free_port, wait_for_port
from services.core.events import TouchpointRecord
from services.core.settings import REPO_ROOT, Settings
from tests.integration.test_scoring import produce

FIGURES_ENV = "CEM_FAULT_FIGURES"  # a JSON-lines file the fault tests append their figures to


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The CEM_* environment that makes a child process use these settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CEM_")}
    env.update(
        CEM_TENANT=settings.tenant,
        CEM_DATABASE_URL=settings.database_url,
        CEM_KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        CEM_TOUCHPOINTS_TOPIC=settings.touchpoints_topic,
        CEM_DLQ_TOPIC=settings.dlq_topic,
        CEM_ALERTS_TOPIC=settings.alerts_topic,
        CEM_SCORING_GROUP_ID=settings.scoring_group_id,
        CEM_TOPIC_PARTITIONS=str(settings.topic_partitions),
        CEM_PRODUCER_IDEMPOTENCE="false",  # tansu has no InitProducerId
        CEM_SCORING_REBALANCE_TIMEOUT_MS=str(settings.scoring_rebalance_timeout_ms),
        CEM_SCORING_SESSION_TIMEOUT_MS=str(settings.scoring_session_timeout_ms),
        CEM_MAX_EVENT_AGE_DAYS=str(settings.max_event_age_days),
        CEM_LOG_FORMAT="text",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.update(extra)
    return env



@contextmanager
def service_process(name: str, settings: Settings, port: int | None = None, **extra_env: str) -> Iterator[str]:
    """One service (`ingest`, `api`, `scoring`) as its own process on a loopback port, as production
    runs it (its own metrics registry, no threads shared with the test); yields its URL."""
    port = port or free_port()
    env = service_env(settings, **{f"CEM_{name.upper()}_PORT": str(port)}, **extra_env)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, 60, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)

class ScoringProcess:
    """`python -m services.cli scoring` as a child process, with its log in a file."""

    def __init__(self, settings: Settings, log_dir: Path, name: str):
        self.settings = settings
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> ScoringProcess:
        env = service_env(self.settings, CEM_SCORING_PORT=str(self.port))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "scoring"],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "ab"),
        )
        return self

    async def wait_listening(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"scoring exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"scoring not listening after {timeout_s} s:\n{self.log_tail()}")

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5.0) as client:
            return await client.get(f"{self.url}{path}")

    async def metric(self, name: str, **labels: str) -> float:
        """One sample from the process's /metrics (0 if absent)."""
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in (await self.get("/metrics")).text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def wait_idle(self, quiet_s: float = 0.7, timeout_s: float = 30.0) -> None:
        """Until no scoring batch committed for quiet_s."""
        deadline = time.monotonic() + timeout_s
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            batches = await self.metric("cem_scoring_batch_duration_seconds_count")
            if batches != last:
                last, since = batches, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"scoring still busy after {timeout_s} s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"scoring still running {timeout_s} s after SIGTERM:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class Stream:
    """Records written to the topic in paced chunks by a background task, until all are sent or
    stop() is called (the test then checks the figures of what was sent)."""

    settings: Settings
    records: list[TouchpointRecord]
    chunk: int = 500
    pause_s: float = 0.1
    sent: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)
    _stopping: bool = field(default=False, repr=False)
    _at_least: int = field(default=0, repr=False)

    def start(self) -> Stream:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        for start in range(0, len(self.records), self.chunk):
            if self._stopping and self.sent >= self._at_least:
                return
            chunk = self.records[start : start + self.chunk]
            await produce(self.settings, chunk)  # acknowledged (acks=all) when it returns
            self.sent += len(chunk)
            await asyncio.sleep(self.pause_s)

    async def stop(self, at_least: int = 0) -> None:
        """Stop after the chunk being written, once at least `at_least` records are sent."""
        self._stopping, self._at_least = True, at_least
        await self.finished()

    async def finished(self, timeout_s: float = 120.0) -> None:
        await asyncio.wait_for(self.task, timeout_s)

    @property
    def sent_records(self) -> list[TouchpointRecord]:
        return self.records[: self.sent]

    @property
    def unique_sent(self) -> list[TouchpointRecord]:
        """The records sent, each event id once (a resent record is the same event)."""
        return list({record.event_id: record for record in self.sent_records}.values())


async def scalar(engine: AsyncEngine, sql: str, **params) -> int:
    async with engine.connect() as conn:
        return (await conn.scalar(text(sql), params)) or 0


async def processed_count(engine: AsyncEngine, tenant: str) -> int:
    return await scalar(engine, "SELECT count(*) FROM processed_events WHERE tenant = :t", t=tenant)


async def wait_until_processed(engine: AsyncEngine, tenant: str, at_least: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = await processed_count(engine, tenant)
        if seen >= at_least:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"only {seen} of {at_least} events scored after {timeout_s} s")
        await asyncio.sleep(0.05)


async def exactly_once_figures(engine: AsyncEngine, tenant: str, unique_event_ids: set[str]) -> dict[str, int]:
    """Lost: sent but never scored. Double counted: counted in the aggregates more than once."""
    async with engine.connect() as conn:
        scored_ids = set(
            (await conn.execute(text("SELECT event_id FROM processed_events WHERE tenant = :t"), {"t": tenant}))
            .scalars()
            .all()
        )
        bucket_events = await conn.scalar(
            text("SELECT coalesce(sum(events), 0) FROM stage_buckets WHERE tenant = :t"), {"t": tenant}
        )
        customer_events = await conn.scalar(
            text("SELECT coalesce(sum(events), 0) FROM customers WHERE tenant = :t"), {"t": tenant}
        )
    lost = len(unique_event_ids - scored_ids)
    counted_once = len(unique_event_ids) - lost
    return {
        "events_lost": lost,
        "events_double_counted": max(int(bucket_events) - counted_once, int(customer_events) - counted_once, 0),
        "unexpected_event_ids": len(scored_ids - unique_event_ids),
    }


def report(request, **figures) -> dict:
    """Print one summary line (visible without -s), write it to figures.json in the test's tmp_path,
    and append it to $CEM_FAULT_FIGURES if set."""
    figures = {"test": request.node.name, **figures}
    line = json.dumps(figures, sort_keys=False)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown without -s
            reporter.write_line(f"\nFAULT FIGURES {line}")
    (request.getfixturevalue("tmp_path") / "figures.json").write_text(line + "\n")
    target = os.environ.get(FIGURES_ENV)
    if target:
        with open(target, "a") as out:
            out.write(line + "\n")
    return figures
