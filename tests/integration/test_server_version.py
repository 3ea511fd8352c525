"""`cem migrate` refuses a PostgreSQL too old for scoring's SQL, naming the version it found."""

import asyncio

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from services.core.db.engine import MIN_SERVER_VERSION_NUM, UnsupportedServer, require_server_version


def _on_the_server(postgres, check):
    """Run check(connection) on a connection to the test server, as the migrations do."""

    async def run():
        engine = create_async_engine(postgres.url())
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(check)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_the_test_server_is_new_enough(postgres):
    _on_the_server(postgres, require_server_version)  # raises if it were older than 18


def test_an_older_server_is_refused_with_its_version(postgres):
    found = _on_the_server(postgres, lambda c: int(c.exec_driver_sql("SHOW server_version_num").scalar_one()))
    assert found >= MIN_SERVER_VERSION_NUM
    # This server stands in for an old one by raising the bar above it.
    with pytest.raises(UnsupportedServer, match=rf"PostgreSQL \d+ or later is required; this server is .+ \({found}\)"):
        _on_the_server(postgres, lambda c: require_server_version(c, minimum=found + 10000))
