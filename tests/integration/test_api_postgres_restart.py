"""The API across a Postgres restart, with pooled connections pinged only after they sat idle
(services/core/db/engine.py): an idle pool is repaired without an error; a connection reused
within the idle period answers at most one 503 with Retry-After, and the next requests work."""

from __future__ import annotations

import asyncio
import functools
import uuid

import pytest

from services.api import app as api_app
from services.core.db import engine as db_engine
from services.core.embedded import EmbeddedPostgres
from services.core.settings import Settings
from tests.integration.test_api import serve

pytestmark = pytest.mark.integration


def settings_for(server: EmbeddedPostgres) -> Settings:
    return Settings(tenant=f"t-{uuid.uuid4().hex[:10]}", database_url=server.url(), auth_disabled=True)


async def test_postgres_restart_with_an_idle_pool_costs_no_error(own_postgres):
    database = own_postgres
    async with serve(settings_for(database)) as client:
        assert (await client.get("/v1/customers")).status_code == 200
        database.stop()
        database.start()  # same port and data
        await asyncio.sleep(db_engine.PING_AFTER_IDLE_S + 0.2)  # the pooled connections are now idle
        for _ in range(5):
            assert (await client.get("/v1/customers")).status_code == 200


async def test_postgres_restart_under_traffic_is_at_most_one_503_with_retry_after(own_postgres, monkeypatch):
    database = own_postgres
    # Never ping: as if the restart happened within the idle period of a busy pool.
    monkeypatch.setattr(api_app, "create_engine", functools.partial(db_engine.create_engine, ping_after_idle_s=3600))
    async with serve(settings_for(database)) as client:
        for _ in range(3):
            assert (await client.get("/v1/customers")).status_code == 200
        database.stop()
        database.start()  # same port and data
        statuses = []
        for _ in range(6):
            response = await client.get("/v1/customers")
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["retry-after"]
                assert response.json()["detail"][0]["field"] == "(database)"
        # The first statement on a broken connection fails as a disconnect; SQLAlchemy then drops
        # every connection of the pool, so the next request connects afresh.
        assert statuses in ([200] * 6, [503] + [200] * 5), statuses
