"""What the benchmarks run against: the embedded Postgres and broker, and the services as
`python -m services.cli <service>` subprocesses (one worker process each, as in production)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.core.db.engine import migrate
from services.core.embedded import EmbeddedKafka, EmbeddedPostgres, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://")


@dataclass
class Service:
    """A child process: a service, a baseline or a load generator."""

    name: str
    process: subprocess.Popen
    log_path: Path
    port: int | None = None
    ready_path: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 35.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Stack:
    """Postgres and the broker on free loopback ports, and the children started against them."""

    work_dir: Path
    durable: bool = False
    postgres: EmbeddedPostgres | None = None
    kafka: EmbeddedKafka | None = None
    children: list[Service] = field(default_factory=list)

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.postgres = EmbeddedPostgres(self.work_dir / "postgres", durable=self.durable)
        self.postgres.start()
        migrate(self.postgres.url())
        self.kafka = EmbeddedKafka()
        self.kafka.start()

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        if self.kafka is not None:
            self.kafka.stop()
        if self.postgres is not None:
            self.postgres.stop()

    @property
    def database_url(self) -> str:
        return self.postgres.url()

    @property
    def dsn(self) -> str:
        return asyncpg_dsn(self.postgres.url())

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap_servers

    def env(self, **cem: str | int | float) -> dict[str, str]:
        """The environment of a child: CEM_* pointing at this stack, plus `cem` overrides."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("CEM_")}
        env.update(
            CEM_DATABASE_URL=self.database_url,
            CEM_KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            CEM_PRODUCER_IDEMPOTENCE="false",  # tansu has no InitProducerId (as `cem dev` sets)
            CEM_LOG_FORMAT="json",
            CEM_LOG_LEVEL="INFO",
            # Capacity is measured, not the per-key limiter (0: no limit). Auth stays on: real keys.
            CEM_RATE_LIMIT_PER_S="0",
            PYTHONPATH=str(REPO_ROOT),
        )
        env.update({f"CEM_{key.upper()}": str(value) for key, value in cem.items()})
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str], port: int | None = None) -> Service:
        log_path = self.work_dir / "logs" / f"{name}-{uuid.uuid4().hex[:6]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO_ROOT,
            stdout=open(log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the bench reaches us, and we stop them in order
        )
        child = Service(name, process, log_path, port)
        self.children.append(child)
        return child

    def start_service(self, service: str, wait: bool = True, **cem) -> Service:
        """`python -m services.cli <service>` on a free port; returns once /readyz answers 200
        (or at once with wait=False: start several, then `ready` each)."""
        port = free_port()
        port_setting = {"ingest": "ingest_port", "api": "api_port", "scoring": "scoring_port"}[service]
        env = self.env(**{port_setting: port, **cem})
        child = self.spawn(service, [sys.executable, "-m", "services.cli", service], env, port)
        child.ready_path = "/readyz"
        if wait:
            ready(child)
        return child

    def start_module(self, name: str, module: str, *args: str, python: str = sys.executable,
                     ready_path: str | None = "/healthz", wait: bool = True, **cem) -> Service:  # fmt: skip
        """`python -m bench.<module>` (a baseline server); returns once it answers."""
        port = free_port()
        child = self.spawn(name, [python, "-m", module, "--port", str(port), *args], self.env(**cem), port)
        child.ready_path = ready_path
        if wait:
            ready(child)
        return child

    def release(self, child: Service) -> None:
        code = child.stop()
        if child in self.children:
            self.children.remove(child)
        if code not in (0, None, -signal.SIGTERM):
            raise RuntimeError(f"{child.name} exited with {code}:\n{child.log_tail()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(postmaster_pid: int) -> float:
    """CPU seconds of the Postgres server: the postmaster, its live backends and workers, and the
    backends that already exited (counted in the postmaster's cutime/cstime)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == postmaster_pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{postmaster_pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        pass
    return total


def ready(child: Service) -> Service:
    if child.ready_path is not None:
        wait_ready(child, f"http://127.0.0.1:{child.port}{child.ready_path}")
    else:
        from services.core.embedded import wait_for_port

        wait_for_port(child.port, 30.0, child.process)
    return child


def wait_ready(child: Service, url: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return
            last = response.text[:300]
        except httpx.HTTPError as error:
            last = repr(error)
        time.sleep(0.1)
    raise TimeoutError(f"{child.name}: {url} not ready after {timeout_s} s ({last})\n{child.log_tail()}")


def new_work_dir(base: Path | None) -> Path:
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="run-", dir=base))
    return Path(tempfile.mkdtemp(prefix="cem-bench-"))


async def create_topic(bootstrap: str, name: str, partitions: int, config: dict[str, str] | None = None) -> None:
    """A topic with explicit retention settings: tansu answers DescribeConfigs with only the
    settings a topic was created with, and Quix Streams needs retention.ms (see peer_quix)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="cem-bench")
    await admin.start()
    try:
        topic_config = {"retention.ms": "604800000", "retention.bytes": "-1", **(config or {})}
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, topic_configs=topic_config)]
        )
    finally:
        await admin.close()
