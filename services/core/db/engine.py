"""The async engine and the migrations runner."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


# A pooled connection idle for longer than this is pinged before use (see _ping_when_idle).
PING_AFTER_IDLE_S = 1.0


def create_engine(database_url: str, pool_size: int = 5, ping_after_idle_s: float = PING_AFTER_IDLE_S) -> AsyncEngine:
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # Errors (logged, and shown in /readyz reasons) name the statement, never its values:
        # customer ids and key hashes stay out of the logs.
        hide_parameters=True,
        connect_args={"server_settings": {"application_name": "cem"}, "timeout": 5},
    )
    _ping_when_idle(engine, ping_after_idle_s)
    return engine


def _ping_when_idle(engine: AsyncEngine, idle_s: float) -> None:
    """Ping a pooled connection before use only if it sat idle for more than `idle_s`.

    `pool_pre_ping` pinged on every checkout: BEGIN, an empty query, ROLLBACK, three round trips
    before each API read. A connection returned less than `idle_s` ago was working then; if the
    server went away since (a restart within that second), the statement that meets the broken
    connection fails as a disconnect, SQLAlchemy invalidates every connection of the pool, the
    request ends (the API answers 503 with Retry-After, scoring retries its batch) and the next
    one connects afresh. A connection idle for longer, which is where a restart usually leaves
    them, is pinged as before and replaced without any error."""

    @event.listens_for(engine.sync_engine, "checkin")
    def _returned(dbapi_connection, record) -> None:
        if dbapi_connection is not None:
            record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checked_out(dbapi_connection, record, proxy) -> None:
        returned_at = record.info.get("returned_at")  # none: connected just now
        if returned_at is None or time.monotonic() - returned_at <= idle_s:
            return
        try:
            dbapi_connection.ping()
        except Exception as error:  # noqa: BLE001 - any failure: the pool replaces the connection
            raise exc.DisconnectionError(f"pooled connection unusable: {type(error).__name__}") from error


# Scoring's merge reads a row's old and new values in one statement (`RETURNING old.*, new.*`).
MIN_SERVER_VERSION_NUM = 180000


class UnsupportedServer(RuntimeError):
    pass


def require_server_version(connection: Connection, minimum: int = MIN_SERVER_VERSION_NUM) -> None:
    """Refuse a PostgreSQL older than `minimum` (as server_version_num) with its version in words."""
    found = int(connection.exec_driver_sql("SHOW server_version_num").scalar_one())
    if found < minimum:
        version = connection.exec_driver_sql("SHOW server_version").scalar_one()
        raise UnsupportedServer(
            f"PostgreSQL {minimum // 10000} or later is required; this server is {version} ({found})"
        )


def alembic_config(database_url: str) -> Config:
    # Imported here: only the migrations need Alembic, and importing it costs every service 0.1 s.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision` (Alembic); safe to run again."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


async def migrate_async(database_url: str) -> None:
    await asyncio.to_thread(migrate, database_url)
