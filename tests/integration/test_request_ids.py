"""Every response carries a request id, and every log line of that request carries the same id;
the access log names the route template, never the raw path (paths carry customer ids)."""

from __future__ import annotations

import logging

import httpx
import pytest

from services.api.app import create_app

pytestmark = pytest.mark.integration


async def test_request_ids_are_echoed_and_logged_without_raw_paths(settings, caplog):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with caplog.at_level(logging.INFO, logger="cem.access"):
                given = await client.get("/v1/customers/jane.doe@example.com", headers={"X-Request-ID": "trace-42"})
                fresh = await client.get("/v1/customers/jane.doe@example.com")
                hostile = await client.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"})
    assert given.status_code == 404
    assert given.headers["x-request-id"] == "trace-42"
    assert len(fresh.headers["x-request-id"]) == 32 and fresh.headers["x-request-id"] != "trace-42"
    assert hostile.headers["x-request-id"] != "bad id\nwith newline"
    access = [record for record in caplog.records if record.name == "cem.access"]
    assert {record.request_id for record in access} >= {"trace-42", fresh.headers["x-request-id"]}
    assert all("jane.doe" not in record.getMessage() for record in caplog.records)
    assert any(record.route == "/v1/customers/{customer_id:path}" for record in access)
