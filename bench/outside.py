"""`python -m bench.outside [--key KEY] [--seconds 10]`: the benchmark's figures, measured from
outside against a stack that is already running, such as the one `make dev` starts.

`python -m bench` starts its own servers, one service at a time, and compares each with a baseline
in the same run. This measures what a user of a running stack sees, all services sharing the
machine: nothing is started, nothing is read from the database, and only public endpoints are
used (ingest, the API, scoring's /metrics). Phases, one line per figure (`name value unit`):

1. ingest, batches of 500 events (JSON), 4 connections as fast as answered: events/s;
2. ingest, single events, 64 connections: the peak requests/s, then p50/p99 at half of it;
3. scoring: a burst of `--burst` new events posted in batches of 500 one after the other:
   events/s from the first post to the last event counted (`cem_scoring_events_total`). Every
   phase before starts once scoring has counted all that the last one posted, and reports how
   long that took (their bodies repeat, so many are duplicates);
4. freshness at 1,000 events/s offered (batches of 50, 20 per second): probes post one event of a
   new customer and read `GET /v1/customers/{id}` every 10 ms until it answers 200; ms p50/p99,
   and the p99 of scoring's own `cem_event_to_score_seconds` over the phase;
5. the API, one connection each: customer lookup, stage metrics 30 d, positioning map, at-risk
   list: ms p50/p99.

The key (`--key`, else CEM_KEY as `cem dev` prints it) needs the scopes events:write and
scores:read; `cem dev` prints an admin key. Start the stack with `CEM_RATE_LIMIT_PER_S=0`, or the
per-key limiter answers 429 past 100 requests/s, as it should. Events go to the key's tenant and
stay there: use a scratch database. Results also go to `--out` (JSON) when given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from urllib.parse import urlsplit

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench import data, httpload
from bench.run import histogram_delta, histogram_quantile, parse_histogram
from services.core.settings import Settings

JOURNEY = "hotel"
CUSTOMERS = 10_000


def _get(path: str) -> dict:
    return {"method": "GET", "path": path}


def _post(path: str, document: dict, events: int) -> dict:
    body = orjson.dumps(document).decode()
    return {"method": "POST", "path": path, "body": body, "content_type": "application/json", "events": events}


class Outside:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.headers = {"Authorization": f"Bearer {args.key}"}
        self.factory = data.EventFactory(data.journeys()[JOURNEY], CUSTOMERS, f"outside-{uuid.uuid4().hex[:8]}")
        self.figures: dict[str, float | None] = {}
        self.accepted = 0  # events of phases 1-2 answered 202, warm-ups included

    def batch(self, events: int) -> dict:
        return _post("/v1/events:batch", {"events": self.factory.events(events)}, events)

    def figure(self, name: str, value: float | None, unit: str) -> None:
        self.figures[name] = value
        shown = "n/a" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"
        print(f"{name} {shown} {unit}", flush=True)

    def load(
        self, url: str, requests: list[dict], connections: int, rate: float | None = None, **spec
    ) -> dict:
        """bench.httpload against `url` for `--seconds` (unless `duration_s` is given) with the key."""
        address = urlsplit(url)
        result = httpload.measure(
            {
                "duration_s": self.args.seconds,
                **spec,
                "host": address.hostname,
                "port": address.port,
                "requests": requests,
                "connections": connections,
                "rate": rate,
                "headers": self.headers,
            }
        )
        if requests[0]["method"] == "POST":
            self.accepted += result["all_ok_events"]
        return result

    def scoring_metrics(self) -> str:
        return httpx.get(f"{self.args.scoring}/metrics", timeout=5).text

    def counted_by_scoring(self) -> int:
        """Records scoring has handled since it started, whatever the result (cem_scoring_events_total)."""
        return sum(
            int(sample.value)
            for family in text_string_to_metric_families(self.scoring_metrics())
            for sample in family.samples
            if sample.name == "cem_scoring_events_total"
        )

    def run(self) -> None:
        args = self.args
        for url in (args.ingest, args.api, args.scoring):
            try:
                httpx.get(f"{url}/readyz", timeout=5).raise_for_status()
            except httpx.HTTPError as error:
                raise SystemExit(f"{url}/readyz: {error}; start the stack first (cem dev)") from None
        counted_before = self.counted_by_scoring()

        batches = [self.batch(500) for _ in range(40)]
        result = self.load(args.ingest, batches, 4)
        self.figure("outside_ingest_batch_events_per_s", result["events_per_s"], "events/s")
        # Each phase starts once scoring has caught up, so that it does not compete with the last
        # one's backlog for the cores. The bodies repeat (the generator cycles through a pool), so
        # scoring counts many of these events as duplicates.
        self.drain("batches", counted_before)

        singles = [_post("/v1/events", event, 1) for event in self.factory.events(2000)]
        peak = self.load(args.ingest, singles, 64)
        self.figure("outside_ingest_single_requests_per_s", peak["rps"], "requests/s")
        self.drain("single_peak", counted_before)
        half = self.load(args.ingest, singles, 64, rate=max(1.0, peak["rps"] / 2))
        self.figure("outside_ingest_single_p50_ms_at_half_rate", half["p50_ms"], "ms")
        self.figure("outside_ingest_single_p99_ms_at_half_rate", half["p99_ms"], "ms")
        self.drain("single_half_rate", counted_before)

        counted_before = self.counted_by_scoring()
        burst = [self.factory.events(500) for _ in range(max(1, args.burst // 500))]
        with httpx.Client(base_url=args.ingest, headers=self.headers, timeout=30) as client:
            started = time.monotonic()
            for events in burst:
                client.post("/v1/events:batch", json={"events": events}).raise_for_status()
            ingested = time.monotonic()
        posted = 500 * len(burst)
        self.wait_until_scoring_counted(counted_before + posted)
        finished = time.monotonic()
        self.figure("outside_ingest_burst_events_per_s", posted / (ingested - started), "events/s")
        self.figure("outside_scoring_events_per_s", posted / (finished - started), "events/s")

        histogram_before = self.event_to_score()
        latencies = asyncio.run(self.freshness())
        committed = histogram_delta(histogram_before, self.event_to_score())
        self.figure("outside_event_to_read_p50_ms_at_1000_eps", httpload.quantile(latencies, 0.5), "ms")
        self.figure("outside_event_to_read_p99_ms_at_1000_eps", httpload.quantile(latencies, 0.99), "ms")
        p99 = histogram_quantile(committed, 0.99)  # scoring's own view: received_at to commit
        self.figure("outside_event_to_score_p99_ms_at_1000_eps", None if p99 is None else p99 * 1000, "ms")

        known = [event["customer_id"] for request in batches[:4] for event in orjson.loads(request["body"])["events"]]
        endpoints = {
            "customer": [_get(f"/v1/customers/{customer}") for customer in known],
            "stages_30d": [_get(f"/v1/journeys/{JOURNEY}/stages?window=30d")],
            "positioning_map": [_get("/v1/positioning-map")],
            "at_risk": [_get("/v1/customers?quadrant=at_risk&order=-revenue&limit=50")],
        }
        for name, requests in endpoints.items():
            result = self.load(args.api, requests, 1, warmup_s=0.3)
            self.figure(f"outside_api_{name}_p50_ms", result["p50_ms"], "ms")
            self.figure(f"outside_api_{name}_p99_ms", result["p99_ms"], "ms")

    def drain(self, phase: str, counted_before: int) -> None:
        ingested = time.monotonic()
        self.wait_until_scoring_counted(counted_before + self.accepted)
        self.figure(f"outside_scoring_caught_up_after_{phase}_s", time.monotonic() - ingested, "s")

    def wait_until_scoring_counted(self, total: int) -> None:
        deadline = time.monotonic() + max(120.0, (total - self.counted_by_scoring()) / 500)
        while (counted := self.counted_by_scoring()) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"scoring counted {counted} events, {total} expected")
            time.sleep(0.1)

    def event_to_score(self) -> list[tuple[float, float]]:
        """Scoring's cem_event_to_score_seconds buckets, cumulative since it started."""
        return parse_histogram(self.scoring_metrics(), "cem_event_to_score_seconds")

    async def freshness(self) -> list[float]:
        """Milliseconds from posting a new customer's event to the first 200 of its lookup, while
        batches of 50 events arrive 20 times a second."""
        args = self.args
        background = [self.batch(50) for _ in range(200)]
        load = asyncio.create_task(
            asyncio.to_thread(self.load, args.ingest, background, 8, rate=20.0, duration_s=args.seconds + 2.0)
        )
        latencies: list[float] = []
        async with (
            httpx.AsyncClient(base_url=args.ingest, headers=self.headers, timeout=10) as ingest,
            httpx.AsyncClient(base_url=args.api, headers=self.headers, timeout=10) as api,
        ):
            await asyncio.sleep(1.0)

            async def probe() -> None:
                event = self.factory.event()
                event["customer_id"] = f"probe-{uuid.uuid4().hex}"
                posted = time.monotonic()
                (await ingest.post("/v1/events", json=event)).raise_for_status()
                while (await api.get(f"/v1/customers/{event['customer_id']}")).status_code != 200:
                    if time.monotonic() - posted > 30:
                        raise RuntimeError(f"{event['customer_id']} not readable 30 s after it was accepted")
                    await asyncio.sleep(0.01)
                latencies.append((time.monotonic() - posted) * 1000)

            probes = []
            for _ in range(int(args.seconds * 10)):  # 10 probes a second, overlapping
                probes.append(asyncio.create_task(probe()))
                await asyncio.sleep(0.1)
            await asyncio.gather(*probes)
        await load
        return sorted(latencies)


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    local = "http://127.0.0.1"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ingest", default=f"{local}:{settings.ingest_port}")
    parser.add_argument("--api", default=f"{local}:{settings.api_port}")
    parser.add_argument("--scoring", default=f"{local}:{settings.scoring_port}")
    key = os.environ.get("CEM_KEY") or os.environ.get("CEM_API_KEY")
    parser.add_argument("--key", default=key, help="default: CEM_KEY, else CEM_API_KEY")
    parser.add_argument("--seconds", type=float, default=10.0, help="each load phase (default 10)")
    parser.add_argument("--burst", type=int, default=50_000, help="events posted at once for phase 3 (batches of 500)")
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if not args.key:
        parser.error("an API key is needed: --key or CEM_KEY (cem dev prints one)")
    outside = Outside(args)
    outside.run()
    if args.out:
        with open(args.out, "wb") as out:
            out.write(orjson.dumps({"figures": outside.figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
