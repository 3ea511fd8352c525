"""`cem`: run the services, the migrations, the whole stack on one machine, the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from services.core.settings import REPO_ROOT, Settings

app = typer.Typer(help="Touchpoint experience service.", no_args_is_help=True, add_completion=False)
log = logging.getLogger("cem")


def _setup_logging() -> None:
    """One line per record on stderr: JSON by default (CEM_LOG_FORMAT=text for people)."""
    from services.core.logs import setup_logging

    setup_logging(Settings())


# Young-generation threshold of the cyclic GC while serving (CPython's default is 700): a request's
# short-lived objects then mostly die before a collection promotes them.
GC_GEN0_THRESHOLD = 20_000


def _serve(app_factory, host: str, port: int) -> None:
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    config = uvicorn.Config(
        app_factory,
        host=host,
        port=port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        # No logging config of uvicorn's: applying one closes every handler already installed, ours
        # included (dictConfig), and the process would log nothing. Its loggers propagate to ours.
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    config.load()  # imports the server's protocol modules, so that the freeze below covers them
    _freeze_heap()
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _freeze_heap() -> None:
    """Keep the objects of start-up (modules, the app, the journey maps: ~125k) out of the cyclic
    GC: a full collection otherwise walks all of them, 100-200 ms with the event loop stopped,
    which was the p99 of every service under load. Collections of the rest stay cheap."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


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
    # so the exit code can say whether the consumers finished their batches (0) or not (1).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    _serve(scoring_app, settings.host, settings.scoring_port)
    scorers = getattr(scoring_app.state, "scorers", None)
    if not scorers:  # the lifespan failed before the consumers started
        log.error("the scoring consumers never started")
        raise typer.Exit(1)
    undrained = [scorer.name for scorer in scorers if not scorer.drained]
    if undrained:
        log.error("scoring did not stop cleanly: the last batch of %s was not committed", ", ".join(undrained))
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
    api_key: Annotated[
        str | None, typer.Option(envvar="CEM_API_KEY", help="API key with events:write (or CEM_API_KEY)")
    ] = None,
) -> None:
    """Post realistic touchpoint events of the shipped journeys to ingest."""
    _setup_logging()
    asyncio.run(_simulate(Settings(), rate, journey, ingest_url, customers, duration, seed, incident, api_key))


async def _simulate(settings, rate, journey_ids, ingest_url, customers, duration, seed, incident, api_key=None) -> None:
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
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    stats = await run_simulation(ingest_url, simulator, rate=rate, duration_s=duration, stop=stop, headers=headers)
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
# cem keys: who may call the services (docs/security.md).

keys_app = typer.Typer(help="API keys: each names a tenant and what it may do.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _with_engine(work):
    """Run `work(engine)` against CEM_DATABASE_URL."""
    from services.core.db.engine import create_engine

    async def run():
        engine = create_engine(Settings().database_url, pool_size=1)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


TENANT_PATTERN = r"[a-z0-9][a-z0-9-]{0,63}"  # as CEM_TENANT's


def _pepper(settings: Settings) -> bytes:
    return settings.api_key_pepper.get_secret_value().encode() if settings.api_key_pepper else b""


@keys_app.command("create")
def keys_create(
    scopes: Annotated[str, typer.Option(help="comma-separated: events:write, scores:read, alerts:write, admin")],
    name: Annotated[str, typer.Option(help="what the key is for, e.g. pos-seoul")],
    tenant: Annotated[str | None, typer.Option(help="the tenant the key acts for (default: CEM_TENANT)")] = None,
) -> None:
    """Create a key and print it: it is shown this once, only its hash is stored."""
    from services.core.auth import parse_scopes
    from services.core.db.api_keys import create_key

    settings = Settings()
    tenant = tenant or settings.tenant
    try:
        chosen = parse_scopes(scopes)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--scopes") from None
    if not re.fullmatch(TENANT_PATTERN, tenant):
        raise typer.BadParameter(f"{tenant!r} is not a tenant id: {TENANT_PATTERN}", param_hint="--tenant")
    if not name.strip():
        raise typer.BadParameter("must not be empty", param_hint="--name")
    row, key = _with_engine(lambda engine: create_key(engine, tenant, name.strip(), list(chosen), _pepper(settings)))
    typer.echo(key)
    typer.echo(f"id {row.id}  tenant {row.tenant}  name {row.name}  scopes {','.join(row.scopes)}", err=True)
    typer.echo("Store the key now: it cannot be shown again.", err=True)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None) -> None:
    """The keys (never their secrets): id, tenant, name, prefix, scopes, created, last used, revoked."""
    from services.core.auth import display_key
    from services.core.db.api_keys import list_keys

    rows = _with_engine(lambda engine: list_keys(engine, tenant))
    if not rows:
        typer.echo("no keys" + (f" for tenant {tenant}" if tenant else ""))
        return

    def when(value) -> str:
        return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"

    header = ("id", "tenant", "name", "key", "scopes", "created", "last used", "revoked")
    table = [header] + [
        (str(row.id), row.tenant, row.name, display_key(row.prefix), ",".join(row.scopes), when(row.created_at),
         when(row.last_used_at), when(row.revoked_at))  # fmt: skip
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for line in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(metavar="ID", help="the key's id (or its prefix)")]) -> None:
    """Revoke a key: refused by every service within CEM_AUTH_CACHE_TTL_S (30 s)."""
    from services.core.db.api_keys import revoke_key

    row = _with_engine(lambda engine: revoke_key(engine, key_id))
    if row is None:
        typer.echo(f"no key with id or prefix {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {row.id} ({row.tenant}/{row.name}) at {row.revoked_at.isoformat()}")


# ---------------------------------------------------------------------------------------------
# cem dev: the whole stack on one machine.


def _wait_ready(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    import httpx  # here, not at the top: every service starts through this module (0.1 s)

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

    os.environ.setdefault("CEM_LOG_FORMAT", "text")  # a person reads this terminal
    _setup_logging()
    # `kill` or a supervisor's SIGTERM stops the stack in order, as Ctrl-C does. SIGINT too when
    # a shell starts a background job with SIGINT ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settings = Settings()
    env = dict(os.environ)
    # The services' warnings and errors in this terminal, not a line per request (CEM_LOG_LEVEL=INFO
    # shows those too).
    env.setdefault("CEM_LOG_LEVEL", "WARNING")
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
        dev_key = None if settings.auth_disabled else asyncio.run(_dev_key(child_settings))
        if dev_key is not None:
            env["CEM_API_KEY"] = dev_key  # the simulator's

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
            + _dev_key_help(dev_key, settings, base)
            + "Ctrl-C stops everything.\n"
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


DEV_KEY_NAME = "cem-dev"


async def _dev_key(settings: Settings) -> str:
    """A fresh admin key for CEM_TENANT; the one of the previous `cem dev` is revoked."""
    from services.core.db.api_keys import create_key, revoke_named
    from services.core.db.engine import create_engine

    engine = create_engine(settings.database_url, pool_size=1)
    try:
        await revoke_named(engine, settings.tenant, DEV_KEY_NAME)
        _, key = await create_key(engine, settings.tenant, DEV_KEY_NAME, ["admin"], _pepper(settings))
        return key
    finally:
        await engine.dispose()


def _dev_key_help(dev_key: str | None, settings: Settings, base: str) -> str:
    if dev_key is None:
        return f"  authentication is disabled (CEM_AUTH_DISABLED): every request acts for tenant {settings.tenant}\n"
    return (
        f"\nDevelopment API key (scope admin, tenant {settings.tenant}; replaced at the next start):\n"
        f"  export CEM_KEY={dev_key}\n"
        f"  curl -s -H \"Authorization: Bearer $CEM_KEY\" {base}:{settings.api_port}/v1/positioning-map\n"
        f"  More keys: cem keys create --tenant {settings.tenant} --scopes events:write --name pos-1\n"
        + _rate_limit_help(settings)
    )


def _rate_limit_help(settings: Settings) -> str:
    measure = "python -m bench.outside (docs/performance.md)"
    if settings.rate_limit_per_s <= 0:
        return f"  Per-key rate limit: off. Load it from outside: {measure}\n"
    return (
        f"  Each key may send {settings.rate_limit_per_s:g} requests/s (bursts of {settings.rate_limit_burst:g}), "
        f"then 429; to measure capacity,\n  start with CEM_RATE_LIMIT_PER_S=0 and run {measure}\n"
    )


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
    from services.core.access import AuthConfigurationError

    try:
        app()
    except AuthConfigurationError as error:  # a setting, not a bug: say what to change, no traceback
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
