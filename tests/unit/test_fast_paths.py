"""The cheaper paths of a single-event request (issue 7), each against what it replaces:
the JSON log formatter (the handler: test_log_handler.py), and RequestGuard's direct call of a
RequestOnlyRoute (services/core/http.py) against the same route through the framework."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import httpx
import orjson
import pytest
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from pythonjsonlogger.orjson import OrjsonFormatter

from services.core.access import Access
from services.core.auth import generate_key, hash_key
from services.core.deadlines import Deadlines
from services.core.http import install_common
from services.core.logs import REQUEST_ID, _fast_json_formatter
from services.core.settings import Settings
from services.ingest.routes import RequestOnlyRoute, direct_routes
from tests.unit.test_access import key_row

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

EXTRA_NAMES = st.sampled_from(["method", "route", "status", "duration_ms", "_private", "tenant", "count"])
EXTRA_VALUES = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=8), st.none(), st.booleans())


@settings(max_examples=200, deadline=None)
@given(
    extra=st.dictionaries(EXTRA_NAMES, EXTRA_VALUES, max_size=5),
    message=st.one_of(st.text(max_size=20).map(lambda text: text.replace("%", "")),
                      st.dictionaries(st.sampled_from(["a", "b"]), st.integers(-1000, 1000), max_size=2)),  # fmt: skip
    level=st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]),
    request_id=st.one_of(st.none(), st.text(alphabet="abc123", min_size=1, max_size=8)),
    created=st.floats(min_value=0, max_value=4e9),
    with_error=st.booleans(),
)
def test_fast_json_formatter_writes_what_orjson_formatter_writes(extra, message, level, request_id, created, with_error):
    reference = OrjsonFormatter(FORMAT, rename_fields={"levelname": "level"})
    fast = _fast_json_formatter()(FORMAT, rename_fields={"levelname": "level"})
    token = REQUEST_ID.set(request_id)
    try:
        exc_info = None
        if with_error:
            try:
                raise ValueError("boom")
            except ValueError:
                exc_info = sys.exc_info()
        logger = logging.getLogger("cem.test")
        first = logger.makeRecord("cem.test", level, "f.py", 1, message, (), exc_info, extra=extra)
        second = logger.makeRecord("cem.test", level, "f.py", 1, message, (), exc_info, extra=extra)
    finally:
        REQUEST_ID.reset(token)
    first.created = second.created = created
    first.msecs = second.msecs = (created - int(created)) * 1000
    assert fast.format(first) == reference.format(second)


# -- the direct call of a RequestOnlyRoute -----------------------------------------------------


async def endpoint(request: Request) -> Response:
    kind = request.query_params.get("kind", "ok")
    body = await request.body()
    if kind == "http":
        raise HTTPException(422, detail=[{"field": "x", "message": "bad"}], headers={"Retry-After": "1"})
    if kind == "plain":
        raise HTTPException(409, detail="a string detail")
    if kind == "crash":
        raise RuntimeError("unexpected")
    return Response(orjson.dumps({"echo": body.decode()}), status_code=202, media_type="application/json")


def make_app(direct: bool, **overrides) -> FastAPI:
    duration = Histogram("t_direct_duration_seconds", "test", ["method", "route", "status"],
                         registry=CollectorRegistry())  # fmt: skip
    app = FastAPI()
    install_common(app, duration, Settings(**overrides))
    router: APIRouter = app.router
    router.add_api_route("/v1/thing", endpoint, methods=["POST"], route_class_override=RequestOnlyRoute)
    if direct:
        app.state.direct_routes.update(direct_routes(router))
    return app


async def call(app: FastAPI, kind: str, headers: dict | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(f"/v1/thing?kind={kind}", content=b"hello", headers=headers or {})


def comparable(response: httpx.Response) -> tuple:
    headers = {name: value for name, value in response.headers.items() if name != "x-request-id"}
    return response.status_code, headers, response.content


@pytest.mark.parametrize("kind", ["ok", "http", "plain", "crash"])
async def test_the_direct_call_answers_as_the_framework_does(kind):
    direct, framework = make_app(direct=True), make_app(direct=False)
    assert direct.state.direct_routes and not framework.state.direct_routes
    assert comparable(await call(direct, kind)) == comparable(await call(framework, kind))


async def test_the_direct_call_is_timed_and_logged_by_route(caplog):
    app = make_app(direct=True)
    with caplog.at_level(logging.INFO, logger="cem.access"):
        response = await call(app, "http", {"x-request-id": "trace-7"})
    assert response.status_code == 422 and response.headers["x-request-id"] == "trace-7"
    (record,) = [record for record in caplog.records if record.name == "cem.access"]
    assert (record.route, record.status, record.request_id) == ("/v1/thing", 422, "trace-7")


async def test_no_direct_call_with_cors_whose_layer_must_see_every_response():
    app = make_app(direct=True, cors_origins="https://app.example")
    response = await call(app, "ok", {"origin": "https://app.example"})
    assert response.status_code == 202
    assert response.headers["access-control-allow-origin"] == "https://app.example"


# -- deadlines checked by one timer (services/core/deadlines.py) -------------------------------


async def test_a_deadline_raises_timeout_error_like_asyncio_timeout():
    deadlines = Deadlines(0.1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadlines.within() as deadline:
            await asyncio.sleep(5)
    assert deadline.expired() and 0.1 <= time.monotonic() - started < 0.5
    assert asyncio.current_task().cancelling() == 0  # our cancellation was taken back


async def test_a_deadline_met_or_cleared_does_not_fire():
    deadlines = Deadlines(0.1)
    async with deadlines.within() as deadline:
        await asyncio.sleep(0.01)
    assert not deadline.expired()
    async with deadlines.within() as deadline:
        deadline.clear()
        await asyncio.sleep(0.25)
    assert not deadline.expired()


async def test_an_outside_cancellation_stays_a_cancellation():
    deadlines = Deadlines(0.05)

    async def work() -> None:
        async with deadlines.within():
            await asyncio.sleep(5)

    task = asyncio.create_task(work())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_deadlines_fire_in_order_and_only_when_due():
    deadlines = Deadlines(0.2)
    fired: list[int] = []

    async def work(number: int, seconds: float) -> None:
        try:
            async with deadlines.within():
                await asyncio.sleep(seconds)
        except TimeoutError:
            fired.append(number)

    await asyncio.gather(*(work(number, 0.5 if number % 2 else 0.01) for number in range(20)))
    assert fired == [number for number in range(20) if number % 2]


# -- a known key skips parsing and the HMAC (services/core/access.py) --------------------------


async def test_a_known_key_is_recognised_without_its_hmac_and_a_revocation_still_shows():
    key, now, lookups = generate_key(), [0.0], []
    access = Access(Settings(auth_cache_ttl_s=30, auth_cache_stale_s=0, rate_limit_per_s=0), clock=lambda: now[0])
    rows = [key_row(key), key_row(key, revoked=True)]

    async def lookup(prefix, digest):
        lookups.append(digest)
        return rows[len(lookups) - 1]

    access.resolver._lookup = lookup
    request = Request({"type": "http", "headers": [(b"authorization", f"Bearer {key.text}".encode())],
                       "client": ("127.0.0.1", 1)})  # fmt: skip
    caller = await access.authenticate(request)
    hashes = []
    access.resolver.digest = lambda presented: hashes.append(presented) or hash_key(presented)
    assert await access.authenticate(request) is caller and not hashes and len(lookups) == 1
    assert key.text.encode() not in b"".join([*access.resolver._known_digests, *access.resolver._known_digests.values()])
    now[0] += 31  # past the cache's TTL: verified again, and the revocation shows
    with pytest.raises(HTTPException) as refused:
        await access.authenticate(request)
    assert refused.value.status_code == 401 and "revoked" in refused.value.detail[0]["message"]
    assert len(lookups) == 2 and len(hashes) == 1


async def test_an_unknown_key_is_never_remembered():
    key = generate_key()
    access = Access(Settings(rate_limit_per_s=0))

    async def lookup(prefix, digest):
        return None

    access.resolver._lookup = lookup
    request = Request({"type": "http", "headers": [(b"authorization", f"Bearer {key.text}".encode())],
                       "client": ("127.0.0.1", 1)})  # fmt: skip
    with pytest.raises(HTTPException):
        await access.authenticate(request)
    assert not access.resolver._known_digests
