"""`cem`: run the services, the migrations, the whole stack on one machine, the simulator."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from services.core.settings import REPO_ROOT, Settings

app = typer.Typer(help="Touchpoint experience service.", no_args_is_help=True, add_completion=False)
log = logging.getLogger("cem")


def _setup_logging() -> None:
    """One line per record on stderr: JSON by default (CEM_LOG_FORMAT=text for people)."""
    settings = Settings()
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level"})
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _serve(app_factory, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app_factory,
        host=host,
        port=port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic)."""
    from services.core.db.engine import migrate as run_migrations

    _setup_logging()
    run_migrations(Settings().database_url)
    typer.echo("database schema is up to date")


@app.command()
def ingest() -> None:
    """Run the ingest service (HTTP, default port 8001)."""
    from services.ingest.app import create_app

    _setup_logging()
    settings = Settings()
    _serve(create_app(settings), settings.host, settings.ingest_port)


@app.command()
def scoring() -> None:
    """Run the scoring consumer (health and metrics on port 8002)."""
    from services.scoring.app import create_app

    _setup_logging()
    settings = Settings()
    scoring_app = create_app(settings)
    # uvicorn re-raises SIGTERM after its graceful shutdown; a handler turns that into a return,
    # so the exit code can say whether the consumer finished its batch (0) or not (1).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    _serve(scoring_app, settings.host, settings.scoring_port)
    scorer = getattr(scoring_app.state, "scorer", None)
    if scorer is None or not scorer.drained:
        log.error("the scoring consumer did not stop cleanly; its last batch was not committed")
        raise typer.Exit(1)


@app.command()
def api() -> None:
    """Run the query API (HTTP, default port 8000)."""
    from services.api.app import create_app

    _setup_logging()
    settings = Settings()
    _serve(create_app(settings), settings.host, settings.api_port)


@app.command()
def simulate(
    rate: Annotated[float, typer.Option(help="events per second")] = 50.0,
    journey: Annotated[list[str] | None, typer.Option(help="journey id (repeat for several); default: all")] = None,
    ingest_url: Annotated[str, typer.Option(help="base URL of the ingest service")] = "http://127.0.0.1:8001",
    customers: Annotated[int, typer.Option(help="size of the simulated customer population")] = 2000,
    duration: Annotated[float | None, typer.Option(help="seconds to run; default: until Ctrl-C")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: a new one each run)")] = None,
    incident: Annotated[bool, typer.Option(help="inject a recurring incident at one stage")] = True,
) -> None:
    """Post realistic touchpoint events of the shipped journeys to ingest."""
    _setup_logging()
    asyncio.run(_simulate(Settings(), rate, journey, ingest_url, customers, duration, seed, incident))


async def _simulate(settings, rate, journey_ids, ingest_url, customers, duration, seed, incident) -> None:
    from services.core.journeys import load_journeys
    from services.simulator import JourneySimulator, default_incident, run_simulation

    journeys = load_journeys(settings.journeys_dir)
    unknown = sorted(set(journey_ids or []) - set(journeys))
    if unknown:
        raise typer.BadParameter(f"unknown journey {unknown}; known journeys: {', '.join(sorted(journeys))}")
    chosen = journey_ids or sorted(journeys)
    simulator = JourneySimulator(
        journeys,
        journey_ids=chosen,
        customers=customers,
        seed=seed,
        incident=default_incident(journeys, chosen) if incident else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stats = await run_simulation(ingest_url, simulator, rate=rate, duration_s=duration, stop=stop)
    typer.echo(f"simulation finished: {stats}")


# ---------------------------------------------------------------------------------------------
# cem dlq: the records scoring could not score.

dlq_app = typer.Typer(help="The dead-letter topic: records scoring could not score.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("replay")
def dlq_replay(
    limit: Annotated[int | None, typer.Option(min=1, help="replay at most N dead letters")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be replayed; send nothing")] = False,
    group: Annotated[
        str | None, typer.Option(help="replay group keeping the position; a new one starts over")
    ] = None,
) -> None:
    """Re-submit dead letters to the touchpoint topic once their cause is fixed (scored event ids count once)."""
    from services.scoring.dlq import replay_dead_letters

    _setup_logging()
    asyncio.run(replay_dead_letters(Settings(), limit=limit, dry_run=dry_run, group_id=group, echo=typer.echo))


# ---------------------------------------------------------------------------------------------
# cem dev: the whole stack on one machine.


def _wait_ready(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(process.args[-1:])} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


@app.command()
def dev(  # noqa: C901 - one linear start-up sequence
    simulate: Annotated[bool, typer.Option("--simulate", help="feed realistic journeys into the stack")] = False,
    rate: Annotated[float, typer.Option(help="simulated events per second")] = 50.0,
    data_dir: Annotated[Path, typer.Option(help="where Postgres keeps its data")] = REPO_ROOT / ".cem",
) -> None:
    """Run everything on this machine: Postgres and a Kafka-protocol broker (embedded, unless
    CEM_DATABASE_URL / CEM_KAFKA_BOOTSTRAP_SERVERS point elsewhere), ingest, scoring and the API."""
    from services.core.db.engine import migrate as run_migrations
    from services.core.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
    from services.core.kafka import ensure_topics

    _setup_logging()
    # `kill` or a supervisor's SIGTERM stops the stack in order, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    settings = Settings()
    env = dict(os.environ)
    env.setdefault("CEM_LOG_FORMAT", "text")  # a person reads this terminal
    embedded: list = []
    children: list[subprocess.Popen] = []
    try:
        if "CEM_DATABASE_URL" not in os.environ:
            postgres = EmbeddedPostgres(data_dir / "postgres", port=_port_or_free(54329, free_port))
            started = time.monotonic()
            env["CEM_DATABASE_URL"] = postgres.start()
            embedded.append(postgres)
            typer.echo(f"postgres   {env['CEM_DATABASE_URL']}  (data in {postgres.data_dir}, "
                       f"ready in {time.monotonic() - started:.1f} s)")  # fmt: skip
        if "CEM_KAFKA_BOOTSTRAP_SERVERS" not in os.environ:
            broker = EmbeddedKafka(port=_port_or_free(19092, free_port))
            env["CEM_KAFKA_BOOTSTRAP_SERVERS"] = broker.start()
            env.setdefault("CEM_PRODUCER_IDEMPOTENCE", "false")  # tansu has no InitProducerId
            embedded.append(broker)
            typer.echo(f"kafka      {env['CEM_KAFKA_BOOTSTRAP_SERVERS']}  (tansu, memory-only: topics "
                       "are empty after a restart; scored aggregates stay in Postgres)")  # fmt: skip
        child_settings = Settings(
            database_url=env["CEM_DATABASE_URL"],
            kafka_bootstrap_servers=env["CEM_KAFKA_BOOTSTRAP_SERVERS"],
            producer_idempotence=env.get("CEM_PRODUCER_IDEMPOTENCE", "true").lower() in ("1", "true", "yes"),
        )
        run_migrations(child_settings.database_url)
        asyncio.run(ensure_topics(child_settings))

        cem = [sys.executable, "-m", "services.cli"]
        services = [
            ("scoring", settings.scoring_port),
            ("ingest", settings.ingest_port),
            ("api", settings.api_port),
        ]
        for name, _ in services:
            children.append(subprocess.Popen([*cem, name], env=env))
        for (name, port), process in zip(services, children):
            _wait_ready(f"http://{settings.host}:{port}/readyz", 60, process)
        base = f"http://{settings.host}"
        typer.echo(
            "\nThe stack is up:\n"
            f"  ingest   {base}:{settings.ingest_port}   POST /v1/events, /v1/events:batch   (docs: /docs)\n"
            f"  api      {base}:{settings.api_port}   GET /v1/customers, /v1/journeys, /v1/positioning-map   "
            "(docs: /docs)\n"
            f"  scoring  {base}:{settings.scoring_port}   /readyz, /metrics\n"
            "Ctrl-C stops everything.\n"
        )
        if simulate:
            children.append(
                subprocess.Popen(
                    [*cem, "simulate", "--rate", str(rate), "--ingest-url", f"{base}:{settings.ingest_port}"],
                    env=env,
                )
            )
        while all(process.poll() is None for process in children):
            time.sleep(0.5)
        failed = [process for process in children if process.poll() not in (None, 0)]
        if failed:
            raise RuntimeError(f"a service exited: {' '.join(failed[0].args[2:])} ({failed[0].returncode})")
    except KeyboardInterrupt:
        typer.echo("\nstopping ...")
    finally:
        for process in reversed(children):  # simulator first, scoring last: it drains its batch
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(35)
            except subprocess.TimeoutExpired:
                process.kill()
        for server in reversed(embedded):
            server.stop()
        typer.echo("stopped")


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _port_or_free(preferred: int, free_port) -> int:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
