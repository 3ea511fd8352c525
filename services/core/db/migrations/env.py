"""Alembic environment: runs migrations over the async engine."""

import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from services.core.db.schema import metadata

target_metadata = metadata


# The scoring merge reads a row's old and new values in one statement (`RETURNING old.*, new.*`).
MIN_SERVER_VERSION_NUM = 180000


def _check_server_version(connection) -> None:
    found = connection.exec_driver_sql("SHOW server_version_num").scalar_one()
    if int(found) < MIN_SERVER_VERSION_NUM:
        version = connection.exec_driver_sql("SHOW server_version").scalar_one()
        raise RuntimeError(f"PostgreSQL 18 or later is required; this server is {version}")


def _run(connection) -> None:
    _check_server_version(connection)
    connection.commit()  # ends the check's implicit transaction: Alembic's own must be the outer one
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"))
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
