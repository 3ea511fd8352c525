"""An HTTP/1.1 load generator that costs little per request, run as its own process.

httpx spends a few hundred microseconds of Python per request, which on 2 cores would make the
client the bottleneck; this one writes pre-built requests on keep-alive connections (asyncio
streams on uvloop) and parses only the status line and Content-Length. Two modes:

- closed loop (`rate` None): `connections` clients, each sending its next request as soon as the
  previous answered: the server's maximum rate at that concurrency;
- open loop (`rate` = requests/s): requests are due on a fixed schedule whatever the answers;
  latency counts from the due time, so a stalled server is not hidden (no coordinated omission).

Run: `python -m bench.httpload '<json spec>'`; prints one JSON result line. `measure(spec)` runs it so
from Python and adds the rates and latencies in milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson


@dataclass
class Spec:
    port: int
    requests: list[dict]  # {"method", "path", "body" (str, latin-1), "content_type", "events", "headers"}
    duration_s: float
    connections: int = 8
    rate: float | None = None  # open loop: requests per second
    warmup_s: float = 0.5
    max_requests: int | None = None  # stop after this many (the pool of unique bodies)
    host: str = "127.0.0.1"
    headers: dict[str, str] | None = None  # added to every request (Authorization)


@dataclass
class Result:
    requests: int = 0
    ok: int = 0
    events: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    # Open loop: how late the generator itself started each request (its own scheduling, not the
    # server's): if this tail is near the latency's, the tail is the generator or the machine.
    start_lags: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0
    first_error_body: str | None = None
    all_ok_events: int = 0  # warm-up included: what the server accepted in all


def build(request: dict, host: str, port: int) -> bytes:
    body = request.get("body", "").encode("latin-1")
    lines = [f"{request.get('method', 'GET')} {request['path']} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in request.get("headers", {}).items()]
    if body:
        lines += [f"Content-Type: {request.get('content_type', 'application/json')}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run(spec: Spec) -> Result:
    common = spec.headers or {}
    raws = [
        (
            build({**request, "headers": {**common, **request.get("headers", {})}}, spec.host, spec.port),
            request.get("events", 1),
        )
        for request in spec.requests
    ]
    cycle = itertools.cycle(raws) if spec.max_requests is None else iter(raws * 1)
    result = Result()
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    clock = time.perf_counter
    started = clock()
    measure_from = started + spec.warmup_s
    stop_at = measure_from + spec.duration_s
    cpu_started = time.process_time()
    exhausted = False

    def record(due: float, status: int, body: bytes, events: int) -> None:
        now = clock()
        if 200 <= status < 300:
            result.all_ok_events += events
        if due < measure_from:
            return
        result.requests += 1
        result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
        if 200 <= status < 300:
            result.ok += 1
            result.events += events
        elif result.first_error_body is None:
            result.first_error_body = body[:500].decode(errors="replace")
        result.latencies.append(now - due)

    def failed(error: BaseException) -> None:
        name = type(error).__name__
        result.errors[name] = result.errors.get(name, 0) + 1

    def next_request():
        nonlocal exhausted
        try:
            return next(cycle)
        except StopIteration:
            exhausted = True
            return None

    if spec.rate is None:

        async def client() -> None:
            connection = Connection(spec.host, spec.port)
            while clock() < stop_at and not exhausted:
                item = next_request()
                if item is None:
                    break
                raw, events = item
                due = clock()
                try:
                    status, body = await connection.request(raw)
                except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                    failed(error)
                    connection.close()
                    await asyncio.sleep(0.01)
                    continue
                record(due, status, body, events)
            connection.close()

        await asyncio.gather(*(client() for _ in range(spec.connections)))
    else:
        # One worker per connection, taking the due times in order: a request goes out at its due
        # time, or as soon as a connection is free if all were busy then (its latency still counts
        # from the due time). No task and no timer per request: the generator's own CPU, which
        # shares the machine with the server, stays at that of the closed loop.
        interval = 1.0 / spec.rate
        numbers = itertools.count()

        async def worker() -> None:
            connection = Connection(spec.host, spec.port)
            try:
                while (due := started + next(numbers) * interval) < stop_at:
                    item = next_request()
                    if item is None:
                        break
                    delay = due - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                        if due >= measure_from:  # how late the timer woke (not a wait for a connection)
                            result.start_lags.append(clock() - due)
                    try:
                        status, body = await connection.request(item[0])
                        record(due, status, body, item[1])
                    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                        failed(error)
                        connection.close()
            finally:
                connection.close()

        workers = [asyncio.create_task(worker()) for _ in range(spec.connections)]
        # Whatever is still outstanding at the end gets a bounded grace period to answer.
        _, late = await asyncio.wait(workers, timeout=max(0.0, stop_at - clock()) + 10.0)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    result.elapsed_s = min(clock(), stop_at) - measure_from
    if exhausted:
        result.elapsed_s = clock() - measure_from
    result.client_cpu_s = time.process_time() - cpu_started
    return result


def measure(spec: dict) -> dict:
    """Run the generator on `spec` (the fields of Spec) in its own process; raise unless nearly
    every request was answered 2xx. The result has `rps`, `events_per_s` and `p50_ms` ... `max_ms`."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.httpload", "-"],
        input=orjson.dumps(spec),
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=spec["duration_s"] + spec.get("warmup_s", Spec.warmup_s) + 60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.decode()[-2000:]}")
    result = orjson.loads(done.stdout.splitlines()[-1])
    result["rps"] = result["ok"] / result["elapsed_s"] if result["elapsed_s"] > 0 else 0.0
    result["events_per_s"] = result["events"] / result["elapsed_s"] if result["elapsed_s"] > 0 else 0.0
    result["client_cpu_share"] = result["client_cpu_s"] / max(result["elapsed_s"], 1e-9)
    latency = result.pop("latency_s")
    for name in ("p50", "p90", "p99", "max"):
        result[f"{name}_ms"] = None if latency[name] is None else latency[name] * 1000
    failures = result["requests"] - result["ok"] + sum(result["errors"].values())
    if result["ok"] == 0 or failures > max(5, 0.01 * result["requests"]):
        raise RuntimeError(
            f"load on port {spec['port']}: {result['ok']} ok of {result['requests']}, statuses {result['statuses']}, "
            f"errors {result['errors']}, first error body: {result['first_error_body']}"
        )
    return result


def main() -> None:
    spec = Spec(**orjson.loads(sys.argv[1] if sys.argv[1] != "-" else sys.stdin.buffer.read()))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    result = asyncio.run(run(spec))
    summary = dict(result.__dict__)
    latencies = sorted(summary.pop("latencies"))
    summary["latency_s"] = {name: quantile(latencies, q) for name, q in QUANTILES.items()}
    summary["latency_s"]["max"] = latencies[-1] if latencies else None
    lags = sorted(summary.pop("start_lags"))
    if lags:
        summary["start_lag_ms"] = {name: 1000 * quantile(lags, q) for name, q in QUANTILES.items()}
        summary["start_lag_ms"]["max"] = 1000 * lags[-1]
    os.set_blocking(sys.stdout.fileno(), True)  # the event loop may have left it non-blocking
    sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    sys.stdout.flush()


QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}


def quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


if __name__ == "__main__":
    main()
