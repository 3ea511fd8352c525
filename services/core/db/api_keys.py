"""API key rows: create, list, revoke (the `cem keys` commands) and the lookup behind each request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.core.auth import generate_key, hash_key, parse_scopes
from services.core.db.schema import api_keys

_COLUMNS = [
    api_keys.c.id, api_keys.c.tenant, api_keys.c.name, api_keys.c.prefix, api_keys.c.scopes,
    api_keys.c.created_at, api_keys.c.revoked_at, api_keys.c.last_used_at,
]  # fmt: skip


@dataclass(frozen=True)
class ApiKeyRow:
    id: uuid.UUID
    tenant: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def from_row(cls, row) -> ApiKeyRow:
        return cls(
            id=row.id, tenant=row.tenant, name=row.name, prefix=row.prefix, scopes=tuple(row.scopes),
            created_at=row.created_at, revoked_at=row.revoked_at, last_used_at=row.last_used_at,
        )  # fmt: skip


async def create_key(
    engine: AsyncEngine, tenant: str, name: str, scopes: str | list[str], pepper: bytes = b""
) -> tuple[ApiKeyRow, str]:
    """A new key: its row, and the key itself, which exists nowhere else once the caller drops it."""
    chosen = list(parse_scopes(scopes))
    for _ in range(5):  # a prefix clash (41 bits) is rare; draw again
        key = generate_key()
        try:
            async with engine.begin() as connection:
                row = (
                    await connection.execute(
                        api_keys.insert()
                        .values(id=uuid.uuid4(), tenant=tenant, name=name, prefix=key.prefix,
                                hash=hash_key(key, pepper), scopes=chosen)  # fmt: skip
                        .returning(*_COLUMNS)
                    )
                ).one()
        except IntegrityError:
            continue
        return ApiKeyRow.from_row(row), key.text
    raise RuntimeError("could not draw an unused key prefix")


async def list_keys(engine: AsyncEngine, tenant: str | None = None) -> list[ApiKeyRow]:
    query = select(*_COLUMNS).order_by(api_keys.c.tenant, api_keys.c.created_at, api_keys.c.id)
    if tenant is not None:
        query = query.where(api_keys.c.tenant == tenant)
    async with engine.connect() as connection:
        return [ApiKeyRow.from_row(row) for row in await connection.execute(query)]


async def revoke_key(engine: AsyncEngine, id_or_prefix: str) -> ApiKeyRow | None:
    """Revoke the key with this id (or prefix); revoking twice keeps the first time. None if unknown."""
    try:
        match = api_keys.c.id == uuid.UUID(id_or_prefix)
    except ValueError:
        match = api_keys.c.prefix == id_or_prefix
    async with engine.begin() as connection:
        row = (
            await connection.execute(
                api_keys.update()
                .where(match)
                .values(revoked_at=func.coalesce(api_keys.c.revoked_at, func.now()))
                .returning(*_COLUMNS)
            )
        ).first()
    return ApiKeyRow.from_row(row) if row is not None else None


async def revoke_named(engine: AsyncEngine, tenant: str, name: str) -> int:
    """Revoke every live key of the tenant with this name (`cem dev` replaces its key each start)."""
    async with engine.begin() as connection:
        result = await connection.execute(
            api_keys.update()
            .where(api_keys.c.tenant == tenant, api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
    return result.rowcount


async def find_key(connection: AsyncConnection, prefix: str, digest: bytes) -> ApiKeyRow | None:
    """The key whose prefix and hash both match (revoked or not), marked used; None if there is none.

    Matching the hash in the query (rather than fetching it) means that knowing a prefix, which
    lists show, is not enough to touch the row.
    """
    row = (
        await connection.execute(
            api_keys.update()
            .where(api_keys.c.prefix == prefix, api_keys.c.hash == digest)
            .values(last_used_at=func.now())
            .returning(*_COLUMNS)
        )
    ).first()
    return ApiKeyRow.from_row(row) if row is not None else None
