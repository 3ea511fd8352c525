"""API keys against the real services: 401 without a valid key, 403 without the scope, 429 past
the rate limit, revocation within the cache TTL, open health endpoints, and the `cem keys` commands."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from services.api.app import create_app as create_api
from services.cli import app as cli_app
from services.core.auth import generate_key
from services.core.db.api_keys import create_key, list_keys, revoke_key
from services.core.db.engine import create_engine
from services.core.settings import REPO_ROOT, Settings
from services.ingest.app import create_app as create_ingest
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


@asynccontextmanager
async def running(app, base_url: str):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client:
            yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def event(event_id: str, customer_id: str = "c-1") -> dict:
    return {
        "event_id": event_id,
        "occurred_at": datetime.now(timezone.utc).isoformat(),
        "customer_id": customer_id,
        "journey": "car-rental",
        "stage": "pickup",
        "experience": 6,
    }


def assert_auth_error(response: httpx.Response, status: int, text: str = "") -> dict:
    assert response.status_code == status, response.text
    (error,) = response.json()["detail"]
    assert error["field"] == "authorization" and text in error["message"], error
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    return error


@dataclass
class Stack:
    settings: Settings
    engine: object
    ingest: httpx.AsyncClient
    api: httpx.AsyncClient

    async def key(self, *scopes: str, tenant: str | None = None) -> str:
        _, key = await create_key(self.engine, tenant or self.settings.tenant, "test", list(scopes))
        return key


@pytest.fixture(scope="module")
async def stack(postgres, kafka):
    settings = make_settings(postgres, kafka, auth_disabled=False, auth_cache_ttl_s=0.5)
    async with AsyncExitStack() as exits:
        engine = create_engine(settings.database_url)
        exits.push_async_callback(engine.dispose)
        ingest = await exits.enter_async_context(running(create_ingest(settings), "http://ingest"))
        api = await exits.enter_async_context(running(create_api(settings), "http://api"))
        for _ in range(100):
            if (await ingest.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        yield Stack(settings, engine, ingest, api)


async def test_requests_without_a_valid_key_are_401_with_a_bearer_challenge(stack):
    revoked = await stack.key("admin")
    await revoke_key(stack.engine, revoked.split("_")[1])
    attempts = {
        "missing API key": {},
        "must be 'Bearer <key>'": {"Authorization": "Basic dXNlcjpwYXNz"},
        "not an API key": bearer("not-a-key"),
        "unknown API key": bearer(generate_key().text),
        "was revoked at": bearer(revoked),
    }
    for message, headers in attempts.items():
        assert_auth_error(await stack.api.get("/v1/customers", headers=headers), 401, message)
        assert_auth_error(await stack.api.get("/v1/journeys", headers=headers), 401, message)
        response = await stack.ingest.post("/v1/events", json=event("e-401"), headers=headers)
        error = assert_auth_error(response, 401, message)
        assert "cem_<8 of a-z0-9>_<43 of A-Za-z0-9>" in error["allowed"]
    # Before any other check: an unknown journey is 401 too, not a 404 that would name the journeys.
    assert (await stack.api.get("/v1/journeys/nope")).status_code == 401


async def test_each_route_needs_its_scope_and_admin_holds_every_scope(stack):
    reader, writer, alerts, admin = (
        await stack.key("scores:read"), await stack.key("events:write"), await stack.key("alerts:write"),
        await stack.key("admin"),
    )  # fmt: skip
    some_alert = "/v1/alerts/00000000-0000-0000-0000-000000000000/acknowledge"
    command = {"by": "agent-7"}

    error = assert_auth_error(await stack.ingest.post("/v1/events", json=event("e-403"), headers=bearer(reader)), 403)
    assert "lacks the scope events:write" in error["message"] and error["allowed"] == ["events:write", "admin"]
    assert_auth_error(await stack.api.get("/v1/customers", headers=bearer(writer)), 403, "scores:read")
    assert_auth_error(await stack.api.post(some_alert, json=command, headers=bearer(reader)), 403, "alerts:write")
    assert_auth_error(await stack.api.get("/v1/alerts", headers=bearer(alerts)), 403, "scores:read")

    assert (await stack.ingest.post("/v1/events", json=event("e-w"), headers=bearer(writer))).status_code == 202
    assert (await stack.api.get("/v1/customers", headers=bearer(reader))).status_code == 200
    assert (await stack.api.post(some_alert, json=command, headers=bearer(alerts))).status_code == 404
    assert (await stack.ingest.post("/v1/events", json=event("e-a"), headers=bearer(admin))).status_code == 202
    assert (await stack.api.get("/v1/positioning-map", headers=bearer(admin))).status_code == 200
    assert (await stack.api.post(some_alert, json=command, headers=bearer(admin))).status_code == 404


async def test_health_readiness_metrics_and_docs_stay_open(stack):
    for client in (stack.api, stack.ingest):
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["x-content-type-options"] == "nosniff"


async def test_a_revoked_key_is_refused_within_the_cache_ttl(stack):
    key = await stack.key("scores:read")
    assert (await stack.api.get("/v1/customers", headers=bearer(key))).status_code == 200
    (row,) = [row for row in await list_keys(stack.engine, stack.settings.tenant) if key.split("_")[1] == row.prefix]
    assert row.last_used_at is not None
    await revoke_key(stack.engine, str(row.id))
    await asyncio.sleep(stack.settings.auth_cache_ttl_s + 0.1)
    assert_auth_error(await stack.api.get("/v1/customers", headers=bearer(key)), 401, "revoked")


async def test_reads_are_never_cached_by_clients_or_proxies(stack):
    key = await stack.key("scores:read")
    response = await stack.api.get("/v1/customers", headers=bearer(key))
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


async def test_a_key_past_its_rate_limit_gets_429_with_retry_after_and_others_are_unaffected(postgres, kafka):
    settings = make_settings(postgres, kafka, auth_disabled=False, rate_limit_per_s=0.5, rate_limit_burst=3)
    engine = create_engine(settings.database_url)
    try:
        _, busy = await create_key(engine, settings.tenant, "busy", ["scores:read"])
        _, calm = await create_key(engine, settings.tenant, "calm", ["scores:read"])
        async with running(create_api(settings), "http://api") as api:
            statuses = [(await api.get("/v1/journeys", headers=bearer(busy))).status_code for _ in range(3)]
            assert statuses == [200, 200, 200]
            limited = await api.get("/v1/journeys", headers=bearer(busy))
            error = assert_auth_error(limited, 429, "rate limit of API key cem_")
            assert error["allowed"] == "0.5 requests per second per key, bursts of 3"
            assert limited.headers["retry-after"] == "2"
            assert (await api.get("/v1/journeys", headers=bearer(calm))).status_code == 200
            # Unknown keys cost a lookup each: an address trying many is slowed down.
            statuses = [(await api.get("/v1/journeys", headers=bearer(generate_key().text))).status_code
                        for _ in range(25)]  # fmt: skip
            assert statuses[:20] == [401] * 20 and statuses[-1] == 429
            assert (await api.get("/v1/journeys", headers=bearer(calm))).status_code == 200  # cached keys still work
    finally:
        await engine.dispose()


@pytest.mark.parametrize("create", [create_api, create_ingest], ids=["api", "ingest"])
async def test_every_v1_operation_requires_an_api_key_with_a_scope(create):
    """From the OpenAPI document (which FastAPI builds from each route's effective dependencies)
    and by calling every operation without a key: a route that forgot its scope fails here."""
    app = create(Settings(auth_disabled=False))
    operations = [
        (method, path, operation)
        for path, item in app.openapi()["paths"].items()
        for method, operation in item.items()
    ]
    assert len([path for _, path, _ in operations if path.startswith("/v1/")]) >= 2
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for method, path, operation in operations:
            if not path.startswith("/v1/"):
                assert path in ("/healthz", "/readyz") and "security" not in operation, path
                continue
            (requirement,) = operation["security"]
            assert requirement["apiKey"]
            assert set(requirement["apiKey"]) <= {"events:write", "scores:read", "alerts:write", "admin"}
            response = await client.request(method.upper(), re.sub(r"{[^}]+}", "x", path))
            assert response.status_code == 401, (method, path, response.text)


async def cem(settings: Settings, *args: str) -> Result:
    """The `cem` command line in-process (its own event loop, in a thread), with these settings."""
    env = {"CEM_DATABASE_URL": settings.database_url, "CEM_TENANT": settings.tenant, "CEM_LOG_FORMAT": "text"}
    return await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env=env)


async def test_cem_keys_creates_a_key_shown_once_lists_without_secrets_and_revokes(stack):
    tenant = f"{stack.settings.tenant}-cli"
    created = await cem(stack.settings, "keys", "create", "--tenant", tenant, "--scopes", "scores:read,events:write",
                  "--name", "pos-seoul")  # fmt: skip
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("cem_") and "Store the key now" in created.stderr
    assert (await stack.api.get("/v1/customers", headers=bearer(key))).status_code == 200

    listed = await cem(stack.settings, "keys", "list", "--tenant", tenant)
    assert listed.exit_code == 0 and "pos-seoul" in listed.stdout and "events:write,scores:read" in listed.stdout
    prefix = key.split("_")[1]
    assert f"cem_{prefix}_…" in listed.stdout and key.split("_")[2] not in listed.stdout

    bad = await cem(stack.settings, "keys", "create", "--scopes", "scores:write", "--name", "x")
    assert bad.exit_code == 2 and "unknown scope 'scores:write'" in bad.stderr

    (row,) = await list_keys(stack.engine, tenant)
    revoked = await cem(stack.settings, "keys", "revoke", str(row.id))
    assert revoked.exit_code == 0 and f"revoked {row.id}" in revoked.stdout
    assert (await cem(stack.settings, "keys", "revoke", "nosuchkey")).exit_code == 1
    await asyncio.sleep(stack.settings.auth_cache_ttl_s + 0.1)
    assert_auth_error(await stack.api.get("/v1/customers", headers=bearer(key)), 401, "revoked")


def test_the_services_refuse_to_start_without_auth_off_loopback():
    env = {key: value for key, value in os.environ.items() if not key.startswith("CEM_")}
    env.update(CEM_AUTH_DISABLED="true", CEM_HOST="0.0.0.0")
    result = subprocess.run([sys.executable, "-m", "services.cli", "api"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert "CEM_AUTH_DISABLED=true is allowed only" in result.stderr and "Traceback" not in result.stderr
