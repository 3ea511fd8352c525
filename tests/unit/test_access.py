"""API keys, scopes, rate limits, the key cache and the request guard, without servers."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st

from services.core.access import AuthConfigurationError, AuthUnavailable, KeyResolver, check_auth_configuration
from services.core.auth import (
    ADMIN, ALERTS_WRITE, EVENTS_WRITE, SCORES_READ, InvalidKey, generate_key, hash_key, has_scope, key_matches,
    missing_scopes, parse_key, parse_scopes,
)  # fmt: skip
from services.core.db.api_keys import ApiKeyRow
from services.core.http import install_common
from services.core.limits import RateLimiter, TokenBucket, retry_after_header
from services.core.settings import Settings

# --------------------------------------------------------------------------------------------
# Keys.


def test_a_generated_key_parses_back_to_itself_and_carries_256_bits():
    key = generate_key()
    assert key.text.startswith("cem_") and parse_key(key.text) == key
    assert len(key.secret) == 43 and len(key.prefix) == 8
    assert len({generate_key().text for _ in range(200)}) == 200


@pytest.mark.parametrize(
    "text",
    ["", "cem_", "Bearer cem_abcdefgh_" + "a" * 43, "cem_ABCDEFGH_" + "a" * 43, "cem_abcdefgh_" + "a" * 42,
     "cem_abcdefgh_" + "a" * 43 + "\n", "xyz_abcdefgh_" + "a" * 43, "cem_abcdefgh_" + "a" * 42 + "-"],
)  # fmt: skip
def test_anything_but_the_key_format_is_not_a_key(text):
    with pytest.raises(InvalidKey, match="format"):
        parse_key(text)


@given(st.text(max_size=80))
def test_parsing_never_fails_otherwise_than_invalid_key(text):
    try:
        parse_key(text)
    except InvalidKey:
        pass


def test_the_hash_depends_on_the_pepper_and_only_the_right_key_matches():
    key, other = generate_key(), generate_key()
    stored = hash_key(key, b"pepper")
    assert key_matches(key, stored, b"pepper")
    assert not key_matches(key, stored, b"other pepper")
    assert not key_matches(other, stored, b"pepper")
    assert len(stored) == 32


def test_admin_implies_every_scope_and_the_others_only_themselves():
    assert all(has_scope([ADMIN], scope) for scope in (EVENTS_WRITE, SCORES_READ, ALERTS_WRITE, ADMIN))
    assert has_scope([SCORES_READ], SCORES_READ) and not has_scope([SCORES_READ], ALERTS_WRITE)
    assert missing_scopes([EVENTS_WRITE], [SCORES_READ, EVENTS_WRITE]) == [SCORES_READ]


def test_scopes_are_parsed_into_canonical_order_and_unknown_ones_are_named():
    assert parse_scopes("alerts:write, events:write,events:write") == (EVENTS_WRITE, ALERTS_WRITE)
    with pytest.raises(ValueError, match="unknown scope 'events:read'; known scopes: events:write"):
        parse_scopes("events:read")
    with pytest.raises(ValueError, match="at least one scope"):
        parse_scopes(" , ")


# --------------------------------------------------------------------------------------------
# Rate limits.


def test_a_bucket_lets_a_burst_through_then_the_sustained_rate():
    bucket = TokenBucket(rate_per_s=10, burst=5, tokens=5, updated_s=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0  # refilled one token
    assert bucket.take(10.0) == 0.0 and bucket.tokens == pytest.approx(4.0)  # capped at the burst


def test_each_key_has_its_own_bucket_and_a_zero_rate_means_no_limit():
    limiter = RateLimiter(rate_per_s=1, burst=2)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    assert limiter.take("b", 0.0) == 0.0
    assert limiter.wait("a", 0.5) == pytest.approx(0.5) and limiter.wait("never-seen", 0.5) == 0.0
    unlimited = RateLimiter(rate_per_s=0, burst=1)
    assert all(unlimited.take("a", 0.0) == 0.0 for _ in range(1000))
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"


def test_the_limiter_forgets_the_least_recent_keys_past_its_size():
    limiter = RateLimiter(rate_per_s=1, burst=1, max_keys=2)
    for key in ("a", "b", "c"):
        limiter.take(key, 0.0)
    assert limiter.take("a", 0.0) == 0.0  # forgotten: a new, full bucket
    assert limiter.take("c", 0.0) > 0.0


# --------------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.com"])
def test_auth_can_be_disabled_only_on_a_loopback_address(host):
    with pytest.raises(AuthConfigurationError, match="CEM_AUTH_DISABLED=true is allowed only"):
        check_auth_configuration(Settings(auth_disabled=True, host=host))
    check_auth_configuration(Settings(auth_disabled=False, host=host))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_auth_disabled_on_loopback_is_accepted(host):
    check_auth_configuration(Settings(auth_disabled=True, host=host))


def test_the_services_refuse_to_start_without_auth_on_a_public_address():
    from services.api.app import create_app as create_api
    from services.ingest.app import create_app as create_ingest

    for create in (create_api, create_ingest):
        with pytest.raises(AuthConfigurationError):
            create(Settings(auth_disabled=True, host="0.0.0.0"))


# --------------------------------------------------------------------------------------------
# The key cache: revocation within the TTL, and a database outage.


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key_row(key, revoked: bool = False) -> ApiKeyRow:
    now = datetime.now(timezone.utc)
    return ApiKeyRow(uuid.uuid4(), "t", "n", key.prefix, (SCORES_READ,), now, now if revoked else None, None)


async def test_a_key_is_looked_up_once_per_ttl_and_a_revocation_shows_after_it():
    clock, key = Clock(), generate_key()
    resolver = KeyResolver(Settings(auth_cache_ttl_s=30, auth_cache_stale_s=0), clock=clock)
    answers = [key_row(key), key_row(key, revoked=True)]
    lookups = []

    async def lookup(prefix, digest):
        lookups.append(prefix)
        return answers[len(lookups) - 1]

    resolver._lookup = lookup
    first = await resolver.resolve(key)
    clock.now += 29
    assert await resolver.resolve(key) is first and len(lookups) == 1
    clock.now += 2
    assert (await resolver.resolve(key)).revoked_at is not None and len(lookups) == 2


async def test_concurrent_misses_share_one_lookup():
    key, lookups = generate_key(), []
    resolver = KeyResolver(Settings())

    async def lookup(prefix, digest):
        lookups.append(prefix)
        await asyncio.sleep(0.05)
        return key_row(key)

    resolver._lookup = lookup
    rows = await asyncio.gather(*(resolver.resolve(key) for _ in range(20)))
    assert len(lookups) == 1 and len({row.id for row in rows}) == 1


async def test_during_a_database_outage_recent_keys_still_work_and_others_are_unavailable():
    clock, key, stranger = Clock(), generate_key(), generate_key()
    resolver = KeyResolver(Settings(auth_cache_ttl_s=30, auth_cache_stale_s=300), clock=clock)
    healthy = True

    async def lookup(prefix, digest):
        if not healthy:
            raise OSError("connection refused")
        return key_row(key)

    resolver._lookup = lookup
    row = await resolver.resolve(key)
    healthy = False
    clock.now += 200
    assert await resolver.resolve(key) is row  # verified 200 s ago: within TTL + stale
    with pytest.raises(AuthUnavailable):
        await resolver.resolve(stranger)  # never verified: cannot tell
    clock.now += 200
    with pytest.raises(AuthUnavailable):
        await resolver.resolve(key)  # 400 s: too old


# --------------------------------------------------------------------------------------------
# The request guard (every service's middleware).


def guarded_app(**settings) -> FastAPI:
    app = FastAPI()
    install_common(app, settings=Settings(**settings))

    @app.get("/v1/slow")
    async def slow() -> dict:
        await asyncio.sleep(5)
        return {}

    @app.get("/v1/fast")
    async def fast() -> dict:
        return {"ok": True}

    @app.get("/v1/own-timeout")
    async def own_timeout() -> dict:
        raise TimeoutError("the handler's own")

    return app


async def call(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path, **kwargs)


def assert_error_body(response: httpx.Response, field: str) -> None:
    body = response.json()
    assert list(body) == ["detail"] and body["detail"][0]["field"] == field and body["detail"][0]["message"]


async def test_every_response_carries_the_security_headers():
    response = await call(guarded_app(), "GET", "/v1/fast")
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert response.headers["cache-control"] == "no-store"
    docs = await call(guarded_app(), "GET", "/docs")
    assert docs.status_code == 200 and "content-security-policy" not in docs.headers  # Swagger UI's CDN
    assert docs.headers["x-frame-options"] == "DENY"


async def test_a_long_path_is_414_and_large_headers_are_431():
    app = guarded_app(max_path_bytes=2048, max_header_bytes=4096)
    long_path = await call(app, "GET", "/v1/" + "a" * 2100)
    assert long_path.status_code == 414 and long_path.headers["x-content-type-options"] == "nosniff"
    assert_error_body(long_path, "(path)")
    long_query = await call(app, "GET", "/v1/fast?" + "q=1&" * 600)
    assert long_query.status_code == 414
    large_headers = await call(app, "GET", "/v1/fast", headers={f"x-h{n}": "v" * 200 for n in range(25)})
    assert large_headers.status_code == 431
    assert_error_body(large_headers, "(headers)")
    assert (await call(app, "GET", "/v1/fast", headers={"x-h": "v" * 1000})).status_code == 200


async def test_a_request_without_a_response_in_time_is_503_with_retry_after():
    app = guarded_app(request_timeout_s=0.2)
    response = await call(app, "GET", "/v1/slow")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert_error_body(response, "(request)")
    assert (await call(app, "GET", "/v1/fast")).status_code == 200
    # A TimeoutError raised by the handler itself is not the guard's: it stays the app's 500.
    assert (await call(app, "GET", "/v1/own-timeout")).status_code == 500


async def test_cors_is_closed_unless_origins_are_configured():
    preflight = {"Origin": "https://dash.example", "Access-Control-Request-Method": "GET"}
    closed = await call(guarded_app(), "OPTIONS", "/v1/fast", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    simple = await call(guarded_app(), "GET", "/v1/fast", headers={"Origin": "https://dash.example"})
    assert "access-control-allow-origin" not in simple.headers
    app = guarded_app(cors_origins="https://dash.example, https://other.example")
    opened = await call(app, "OPTIONS", "/v1/fast", headers=preflight)
    assert opened.headers["access-control-allow-origin"] == "https://dash.example"
    foreign = await call(app, "GET", "/v1/fast", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in foreign.headers
