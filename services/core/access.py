"""Who is calling: a request's API key resolved to its tenant and scopes, as FastAPI dependencies.

Every /v1 route depends on `get_tenant` (or `get_caller`) with the scope it needs, so the tenant
always comes from the key and never from the request's body or parameters:

- 401 (with `WWW-Authenticate: Bearer`): no key, not a key, unknown or revoked;
- 403: the key lacks the scope; 429 (with `Retry-After`): the key's rate limit is used up;
- 503 (with `Retry-After`): the database cannot be asked and the key was not verified recently.

A resolved key is cached in the process for `auth_cache_ttl_s` (30 s): revoking a key takes
effect within that time, in every process. Health, readiness and metrics are open.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.auth import (
    ADMIN, ALERTS_WRITE, EVENTS_WRITE, KEY_FORMAT, SCORES_READ, InvalidKey, PresentedKey, display_key, hash_key,
    missing_scopes, parse_key,
)  # fmt: skip
from services.core.db.api_keys import ApiKeyRow, find_key
from services.core.db.engine import create_engine
from services.core.http import field_error
from services.core.limits import RateLimiter, retry_after_header
from services.core.settings import Settings

log = logging.getLogger("cem.access")

LOOKUP_TIMEOUT_S = 3.0
UNAVAILABLE_RETRY_AFTER_S = 2
CACHE_MAX_KEYS = 10_000
# Failed key lookups each cost a database query: per client address, at most this many per second.
FAILED_LOOKUPS_PER_S = 2.0
FAILED_LOOKUPS_BURST = 20
AUTHORIZATION = "authorization"


class AuthConfigurationError(RuntimeError):
    """Settings that would expose the service without authentication."""


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth_configuration(settings: Settings) -> None:
    """Refuse to build a service that would serve every tenant's data without a key to anyone
    who can reach it: CEM_AUTH_DISABLED only on a loopback address."""
    if settings.auth_disabled and not is_loopback(settings.host):
        raise AuthConfigurationError(
            f"CEM_AUTH_DISABLED=true is allowed only when the service binds to a loopback address "
            f"(127.0.0.1, ::1, localhost), but CEM_HOST is {settings.host!r}. Remove CEM_AUTH_DISABLED and "
            "give each client an API key (`cem keys create --tenant T --scopes ...`), or bind to 127.0.0.1."
        )


@dataclass(frozen=True)
class Caller:
    tenant: str
    scopes: tuple[str, ...]
    key_id: str | None = None  # None: authentication is disabled (one tenant, loopback only)
    key_prefix: str | None = None

    @property
    def key_shown(self) -> str:
        return display_key(self.key_prefix) if self.key_prefix else "(authentication disabled)"


class AuthUnavailable(Exception):
    """The key could not be verified: the database did not answer and no recent verification is cached."""


@dataclass
class _Cached:
    key: ApiKeyRow | None  # None: no such key
    verified_s: float
    # What a request with this key resolves to, built once per verification, not per request.
    caller: Caller | None = field(default=None, compare=False)
    rate_key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.key is not None:
            row = self.key
            self.caller = Caller(tenant=row.tenant, scopes=row.scopes, key_id=str(row.id), key_prefix=row.prefix)
            self.rate_key = f"key:{row.id}"


class KeyResolver:
    """Presented key -> its row, through an in-process cache of `auth_cache_ttl_s`.

    Concurrent misses of the same key share one query. If the database fails, a key verified
    within `auth_cache_ttl_s + auth_cache_stale_s` is still accepted (ingest keeps taking events
    through a database outage); an unknown one is a 503, not a 401, as it cannot be told apart.
    """

    def __init__(
        self, settings: Settings, engine: AsyncEngine | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self._settings = settings
        self._engine = engine
        self._own_engine = False
        self._clock = clock
        self._pepper = settings.api_key_pepper.get_secret_value().encode() if settings.api_key_pepper else b""
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[_Cached]] = {}
        # Known keys' texts -> their digest, through a keyed BLAKE2b (a quarter of the HMAC's cost,
        # and the parsing is skipped too); the texts themselves are not kept.
        self._text_key = secrets.token_bytes(32)
        self._known_digests: dict[bytes, bytes] = {}

    def use_engine(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def _get_engine(self) -> AsyncEngine:
        if self._engine is None:
            self._engine = create_engine(self._settings.database_url, pool_size=2)
            self._own_engine = True
        return self._engine

    def digest(self, key: PresentedKey) -> bytes:
        return hash_key(key, self._pepper)

    def _text_id(self, text: str) -> bytes:
        return hashlib.blake2b(text.encode(), key=self._text_key, digest_size=32).digest()

    def known_digest(self, text: str) -> bytes | None:
        """The digest of a key text that was a known key when last verified, else None."""
        return self._known_digests.get(self._text_id(text))

    def remember_digest(self, text: str, digest: bytes) -> None:
        if len(self._known_digests) >= CACHE_MAX_KEYS:
            self._known_digests.clear()
        self._known_digests[self._text_id(text)] = digest

    def fresh(self, digest: bytes) -> _Cached | None:
        """The verification of the key with this digest, if it is recent enough to rely on."""
        cached = self._cache.get(digest)
        if cached is not None and self._clock() - cached.verified_s < self._settings.auth_cache_ttl_s:
            return cached
        return None

    def is_fresh(self, key: PresentedKey) -> bool:
        return self.fresh(self.digest(key)) is not None

    async def resolve(self, key: PresentedKey, digest: bytes | None = None) -> ApiKeyRow | None:
        """The key's row (revoked or not), or None if no key matches. Raises AuthUnavailable."""
        return (await self.verify(key, digest)).key

    async def verify(self, key: PresentedKey, digest: bytes | None = None) -> _Cached:
        """`resolve`, with the caller the row stands for (`digest`: the key's, if already computed)."""
        digest = digest if digest is not None else self.digest(key)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and now - cached.verified_s < self._settings.auth_cache_ttl_s:
            return cached
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Cached] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            try:
                found = await self._lookup(key.prefix, digest)
            except Exception as error:  # noqa: BLE001 - any database failure: serve a recent verification
                stale_limit = self._settings.auth_cache_ttl_s + self._settings.auth_cache_stale_s
                if cached is not None and cached.key is not None and now - cached.verified_s < stale_limit:
                    log.warning("API key lookup failed (%s); using the verification of %.0f s ago",
                                type(error).__name__, now - cached.verified_s)  # fmt: skip
                    future.set_result(cached)
                    return cached
                log.warning("API key lookup failed (%s): answering 503", type(error).__name__)
                unavailable = AuthUnavailable(type(error).__name__)
                future.set_exception(unavailable)
                future.exception()  # retrieved: no "never retrieved" warning if no one else waits
                raise unavailable from None
            verified = self._remember(digest, found)
            future.set_result(verified)
            return verified
        finally:
            self._inflight.pop(digest, None)

    async def _lookup(self, prefix: str, digest: bytes) -> ApiKeyRow | None:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            async with self._get_engine().begin() as connection:
                return await find_key(connection, prefix, digest)

    def _remember(self, digest: bytes, key: ApiKeyRow | None) -> _Cached:
        verified = self._cache[digest] = _Cached(key, self._clock())
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_MAX_KEYS:
            self._cache.popitem(last=False)
        return verified

    async def close(self) -> None:
        if self._own_engine and self._engine is not None:
            await self._engine.dispose()
        self._engine = None


def _unauthorized(message: str, error: str | None = "invalid_token") -> HTTPException:
    challenge = 'Bearer realm="cem"' + (f', error="{error}"' if error else "")
    return HTTPException(
        401,
        detail=[field_error(AUTHORIZATION, message, f"Authorization: Bearer {KEY_FORMAT}")],
        headers={"WWW-Authenticate": challenge},
    )


def _too_many(message: str, allowed: str, wait_s: float) -> HTTPException:
    return HTTPException(
        429, detail=[field_error(AUTHORIZATION, message, allowed)], headers={"Retry-After": retry_after_header(wait_s)}
    )


class Access:
    """The access state of one app: the key resolver and the rate limiters."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        check_auth_configuration(settings)
        self.settings = settings
        self.clock = clock
        self.disabled = settings.auth_disabled
        self.resolver = None if self.disabled else KeyResolver(settings, clock=clock)
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        self.failed_lookups = RateLimiter(FAILED_LOOKUPS_PER_S, FAILED_LOOKUPS_BURST)

    async def close(self) -> None:
        if self.resolver is not None:
            await self.resolver.close()

    async def authenticate(self, request: Request) -> Caller:
        if self.disabled:
            return Caller(tenant=self.settings.tenant, scopes=(ADMIN,))
        header = request.headers.get(AUTHORIZATION)
        if header is None:
            raise _unauthorized("missing API key: send the header Authorization: Bearer <key>", error=None)
        scheme, _, presented = header.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise _unauthorized("the Authorization header must be 'Bearer <key>'")

        assert self.resolver is not None
        # A known key verified recently: no parsing, no HMAC.
        known = self.resolver.known_digest(presented)
        verified = self.resolver.fresh(known) if known is not None else None
        if verified is None:
            verified = await self._authenticate_slowly(request, presented)
        row = verified.key
        if row is None:
            self.failed_lookups.take(f"address:{request.client.host if request.client else '?'}", self.clock())
            raise _unauthorized("unknown API key")
        if row.revoked_at is not None:
            raise _unauthorized(f"API key {display_key(row.prefix)} was revoked at {row.revoked_at.isoformat()}")

        wait_s = self.limiter.take(verified.rate_key, self.clock())
        if wait_s > 0:
            raise _too_many(
                f"rate limit of API key {display_key(row.prefix)} exceeded; retry after the Retry-After delay",
                f"{self.settings.rate_limit_per_s:g} requests per second per key, "
                f"bursts of {self.settings.rate_limit_burst}",
                wait_s,
            )
        assert verified.caller is not None
        return verified.caller

    async def _authenticate_slowly(self, request: Request, presented: str) -> _Cached:
        """Parse the key, hash it and verify it (from the cache or the database)."""
        try:
            key = parse_key(presented)
        except InvalidKey as invalid:
            raise _unauthorized(str(invalid)) from None
        assert self.resolver is not None
        digest = self.resolver.digest(key)  # one HMAC: the cache and the lookup share it
        verified = self.resolver.fresh(digest)
        if verified is None:
            address = f"address:{request.client.host if request.client else '?'}"
            wait_s = self.failed_lookups.wait(address, self.clock())
            if wait_s > 0:
                raise _too_many(
                    "too many requests with unknown API keys from this address",
                    f"{FAILED_LOOKUPS_PER_S:g} failed key lookups per second, bursts of {FAILED_LOOKUPS_BURST}",
                    wait_s,
                )
            verified = await self._verify(key, digest)
        if verified.key is not None:
            self.resolver.remember_digest(presented, digest)
        return verified

    async def _verify(self, key: PresentedKey, digest: bytes) -> _Cached:
        assert self.resolver is not None
        try:
            return await self.resolver.verify(key, digest)
        except AuthUnavailable:
            raise HTTPException(
                503,
                detail=[field_error(AUTHORIZATION, "the API key cannot be verified now: the database is "
                                    "unavailable; retry later")],  # fmt: skip
                headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
            ) from None

    @staticmethod
    def authorize(caller: Caller, required: list[str]) -> None:
        missing = _missing_scopes(caller.scopes, tuple(required))
        if missing:
            granted = ", ".join(caller.scopes) or "none"
            raise HTTPException(
                403,
                detail=[field_error(
                    AUTHORIZATION,
                    f"API key {caller.key_shown} (scopes: {granted}) lacks the scope {missing[0]} this request needs",
                    [*missing, ADMIN],
                )],  # fmt: skip
                headers={
                    "WWW-Authenticate": f'Bearer realm="cem", error="insufficient_scope", scope="{" ".join(missing)}"'
                },
            )


@lru_cache(maxsize=1024)  # a handful of (granted, required) pairs, asked on every request
def _missing_scopes(granted: tuple[str, ...], required: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(missing_scopes(granted, required))


def install_access(app: Any, settings: Settings) -> Access:
    """The app's access state (refuses unsafe settings); the lifespan closes it."""
    access = Access(settings)
    app.state.access = access
    return access


# Documents the scheme in OpenAPI (the "Authorize" button of /docs); the checks are ours.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    bearerFormat=KEY_FORMAT,
    description="An API key (`cem keys create`): `Authorization: Bearer cem_<prefix>_<secret>`. "
    "Its tenant scopes every request; its scopes say what it may do.",
)


async def authorized(request: Request, scopes: list[str]) -> Caller:
    """The authenticated caller, holding `scopes`: `get_caller` as a plain call, for a hot route
    that declares `Security(bearer_scheme, scopes=...)` (OpenAPI) and checks the key in its handler,
    as each layer of FastAPI dependencies costs more than the check itself."""
    access: Access = request.app.state.access
    state = request.scope.setdefault("state", {})  # request.state's storage, without its wrapper
    caller = state.get("caller")
    if caller is None:  # once per request: one rate-limit token however many routes' dependencies ask
        caller = state["caller"] = await access.authenticate(request)
    access.authorize(caller, scopes)
    return caller


async def get_caller(
    security_scopes: SecurityScopes,
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Caller:
    """The authenticated caller, holding the scopes the route asks for."""
    return await authorized(request, security_scopes.scopes)


async def get_tenant(caller: Annotated[Caller, Security(get_caller)]) -> str:
    """The tenant of the caller's key: every read and write is scoped to it."""
    return caller.tenant


def requires(scope: str) -> Any:
    """A route or router dependency that only checks the scope."""
    return Security(get_caller, scopes=[scope])


EventsWriterTenant = Annotated[str, Security(get_tenant, scopes=[EVENTS_WRITE])]
ScoresReaderTenant = Annotated[str, Security(get_tenant, scopes=[SCORES_READ])]
AlertsWriterTenant = Annotated[str, Security(get_tenant, scopes=[ALERTS_WRITE])]
# Changing a tenant's configuration (journey maps): the whole caller, who is recorded with the change.
AdminCaller = Annotated[Caller, Security(get_caller, scopes=[ADMIN])]
# Any authenticated caller, whatever its scopes: for lookups that the route's own scope guards.
AnyCaller = Annotated[Caller, Security(get_caller)]
