"""Stored journey versions of each tenant (table tenant_journeys): append a version, read the
history, and keep a process's JourneyCatalog up to date with the latest versions."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.core.db.schema import tenant_journeys
from services.core.journeys import Journey, JourneyCatalog, JourneyError, JourneyVersion, load_journeys, parse_journey
from services.core.settings import Settings

log = logging.getLogger("cem.journeys")

_LATEST = text(
    "SELECT DISTINCT ON (tenant, journey) tenant, journey, version, document IS NULL AS retired, "
    "created_at, created_by FROM tenant_journeys ORDER BY tenant, journey, version DESC"
)


def _version(row, journey: Journey | None) -> JourneyVersion:
    return JourneyVersion(
        tenant=row.tenant, journey_id=row.journey, version=row.version, journey=journey,
        created_at=row.created_at, created_by=row.created_by,
    )  # fmt: skip


def _parse_stored(row) -> Journey | None:
    if row.document is None:
        return None
    return parse_journey(row.document, origin=f"tenant {row.tenant!r} journey {row.journey!r} v{row.version}")


async def append_version(
    conn: AsyncConnection,
    tenant: str,
    journey_id: str,
    document: dict | None,
    base_version: int,
    created_by: str | None,
) -> JourneyVersion | None:
    """Store version base_version + 1 (a retirement when document is None). None when that version
    exists already: someone else changed the journey since base_version was read."""
    journey = parse_journey(document) if document is not None else None  # validated again: never store junk
    row = (
        await conn.execute(
            insert(tenant_journeys)
            .values(tenant=tenant, journey=journey_id, version=base_version + 1, document=document,
                    created_by=created_by)  # fmt: skip
            .on_conflict_do_nothing()
            .returning(*tenant_journeys.c)
        )
    ).one_or_none()
    return _version(row, journey) if row is not None else None


async def history(conn: AsyncConnection, tenant: str, journey_id: str) -> list[JourneyVersion]:
    """Every stored version of one journey of the tenant, newest first."""
    rows = await conn.execute(
        select(tenant_journeys)
        .where(tenant_journeys.c.tenant == tenant, tenant_journeys.c.journey == journey_id)
        .order_by(tenant_journeys.c.version.desc())
    )
    return [_version(row, _parse_stored(row)) for row in rows]


async def latest_version(conn: AsyncConnection, tenant: str, journey_id: str) -> JourneyVersion | None:
    row = (
        await conn.execute(
            select(tenant_journeys)
            .where(tenant_journeys.c.tenant == tenant, tenant_journeys.c.journey == journey_id)
            .order_by(tenant_journeys.c.version.desc())
            .limit(1)
        )
    ).one_or_none()
    return _version(row, _parse_stored(row)) if row is not None else None


class JourneyLoader:
    """Re-reads the latest stored versions into a JourneyCatalog. Documents are fetched and parsed
    only for versions not seen before, so a refresh with no changes is one small query."""

    def __init__(self, catalog: JourneyCatalog, refresh_s: float):
        self.catalog = catalog
        self.refresh_s = refresh_s
        self._parsed: dict[tuple[str, str, int], Journey | None] = {}

    @classmethod
    def shipped(cls, settings: Settings) -> JourneyLoader:
        """A loader over the shipped maps of CEM_JOURNEYS_DIR (raises JourneyError on a broken map)."""
        return cls(JourneyCatalog(load_journeys(settings.journeys_dir)), settings.journeys_refresh_s)

    async def refresh(self, conn: AsyncConnection) -> None:
        rows = list(await conn.execute(_LATEST))
        keys = [(row.tenant, row.journey, row.version) for row in rows]
        missing = [key for key in keys if key not in self._parsed]
        if missing:
            documents = await conn.execute(
                text(
                    "SELECT t.tenant, t.journey, t.version, t.document FROM tenant_journeys t "
                    "JOIN unnest(CAST(:tenants AS text[]), CAST(:journeys AS text[]), CAST(:versions AS integer[])) "
                    "AS k(tenant, journey, version) USING (tenant, journey, version)"
                ),
                dict(zip(("tenants", "journeys", "versions"), map(list, zip(*missing)))),
            )
            for row in documents:
                try:
                    self._parsed[(row.tenant, row.journey, row.version)] = _parse_stored(row)
                except JourneyError as error:
                    # Stored when valid; invalid now only if the schema became stricter. Keep serving
                    # the other journeys and say which one is skipped.
                    log.error("stored journey skipped: %s", error)
        latest = [_version(row, self._parsed[key]) for row, key in zip(rows, keys) if key in self._parsed]
        self.catalog.replace(latest)

    async def refresh_with(self, engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            await self.refresh(conn)

    async def load_at_start(self, engine: AsyncEngine, timeout_s: float = 5.0) -> None:
        """One attempt before serving, so that the first requests find the maps; if the database is
        down, keep_fresh retries and requests needing the maps are answered 503 meanwhile."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.refresh_with(engine)
        except Exception as error:  # noqa: BLE001 - reported, retried by keep_fresh
            log.warning("journey maps not loaded at start: %s: %s", type(error).__name__, error)

    async def keep_fresh(self, engine: AsyncEngine) -> None:
        """Refresh every refresh_s until cancelled; a database outage keeps the last catalog."""
        while True:
            await asyncio.sleep(self.refresh_s if self.catalog.loaded else min(self.refresh_s, 1.0))
            try:
                await self.refresh_with(engine)
            except Exception as error:  # noqa: BLE001 - retried at the next tick; the catalog stays as it was
                log.warning("journey maps not refreshed: %s: %s", type(error).__name__, error)

