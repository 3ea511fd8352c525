"""The async engine and the migrations runner."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def create_engine(database_url: str, pool_size: int = 5) -> AsyncEngine:
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # Errors (logged, and shown in /readyz reasons) name the statement, never its values:
        # customer ids and key hashes stay out of the logs.
        hide_parameters=True,
        connect_args={"server_settings": {"application_name": "cem"}, "timeout": 5},
    )


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision` (Alembic); safe to run again."""
    command.upgrade(alembic_config(database_url), revision)


async def migrate_async(database_url: str) -> None:
    await asyncio.to_thread(migrate, database_url)
