"""quadrant_totals (migrations 0007 and 0011) against the customers it sums, after random writes.

Whatever statements write customers (the scoring upsert INSERT ... ON CONFLICT DO UPDATE with
new and existing rows, COPY, the sweep's quadrant moves, deletes), the totals read through
quadrant_totals_live must be exactly the GROUP BY over the current rows: the statement triggers
append the new rows and subtract the old, in exact numeric sums, and fold them into the totals,
so no history of updates leaves a residue. Writers of one tenant never wait for each other.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.core.revenue import INDEX_UNIT_BITS, REVENUE_BAND_BITS, REVENUE_UNIT_BITS, band_revenue_at, index_sum
from services.core.scoring import QUADRANTS, revenue_rank

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 24, 12, tzinfo=timezone.utc)
IDS = [f"c{index}" for index in range(12)]
JOURNEYS = ["hotel", "car-rental"]
# 90 days (the default), an hour and a minute: ranks of ~220, ~5e5 and ~3e7, bands of each size.
HALF_LIVES_S = [90 * 86400.0, 3600.0, 60.0]

COLUMNS = (
    "customer_id", "last_event_at", "first_event_at", "latest_journey", "latest_event_id", "index_gap_sum",
    "index_weight_sum", "trend_gap_sum", "trend_weight_sum", "revenue_sum", "events", "experience_index",
    "trend", "revenue_rank", "quadrant",
)  # fmt: skip
TYPES = (
    "text", "timestamptz", "timestamptz", "text", "text", "float8", "float8", "float8", "float8", "float8",
    "bigint", "float8", "float8", "float8", "text",
)  # fmt: skip
# The shape of the scoring upsert (services/scoring/store.py): unnest arrays, ON CONFLICT DO UPDATE.
UPSERT = (
    f"INSERT INTO customers (tenant, {', '.join(COLUMNS)}) SELECT $1, * FROM unnest("
    + ", ".join(f"${index + 2}::{kind}[]" for index, kind in enumerate(TYPES))
    + ") ON CONFLICT (tenant, customer_id) DO UPDATE SET "
    + ", ".join(f"{name} = EXCLUDED.{name}" for name in COLUMNS[1:])
)
# The exact terms the triggers add, summed over the current rows (the migration's definition).
EXPECTED = f"""
    SELECT latest_journey, quadrant, band, count(*) AS customers,
        sum(round(experience_index * {2 ** INDEX_UNIT_BITS}.0)::bigint) AS index_units,
        sum(CASE WHEN revenue_rank > -1e299 THEN round(power(2.0::float8,
            revenue_rank - {REVENUE_BAND_BITS}.0 * band + {REVENUE_UNIT_BITS}))::bigint ELSE 0 END) AS revenue_units
    FROM customers CROSS JOIN LATERAL (SELECT CASE WHEN revenue_rank > -1e299
        THEN floor(revenue_rank / {REVENUE_BAND_BITS}.0)::bigint ELSE 0 END AS band) AS b
    WHERE tenant = $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
TOTALS = (
    "SELECT latest_journey, quadrant, band, customers, index_units, revenue_units "
    "FROM quadrant_totals_live WHERE tenant = $1 ORDER BY latest_journey, quadrant, band"
)
FOLDED = TOTALS.replace("quadrant_totals_live", "quadrant_totals")
PENDING = "SELECT count(*) FROM quadrant_total_deltas WHERE tenant = $1"


def dsn(postgres) -> str:
    return postgres.url().replace("postgresql+asyncpg://", "postgresql://")


# Revenue over eighteen orders of magnitude, and none: when a large customer leaves a quadrant,
# float sums would keep its rounding error, as large as the small customers left.
revenues = st.one_of(
    st.just(0.0), st.floats(0.01, 100.0), st.floats(1e9, 1e12), st.floats(1e-6, 1e6)
)
customer_rows = st.fixed_dictionaries(
    {
        "customer_id": st.sampled_from(IDS),
        "journey": st.sampled_from(JOURNEYS),
        "quadrant": st.sampled_from(QUADRANTS),
        "experience_index": st.floats(-10, 10),
        "revenue": revenues,
        "age_s": st.floats(0, 200 * 86400.0),
    }
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.lists(customer_rows, min_size=1, max_size=8)),
        st.tuples(st.just("copy"), st.lists(customer_rows, min_size=1, max_size=4)),
        st.tuples(st.just("move"), st.lists(st.sampled_from(IDS), min_size=1, max_size=4), st.sampled_from(QUADRANTS)),
        st.tuples(st.just("delete"), st.lists(st.sampled_from(IDS), min_size=1, max_size=3)),
    ),
    min_size=1,
    max_size=12,
)


def values(row: dict, half_life_s: float, customer_id: str | None = None) -> tuple:
    last = NOW - timedelta(seconds=row["age_s"])
    rank = revenue_rank(row["revenue"], last.timestamp(), half_life_s)
    return (customer_id or row["customer_id"], last, last - timedelta(days=1), row["journey"], "e", 0.0, 1.0, 0.0,
            1.0, row["revenue"], 1, row["experience_index"], 0.0, rank, row["quadrant"])  # fmt: skip


async def apply(conn: asyncpg.Connection, tenant: str, operation: tuple, half_life_s: float, step: int) -> None:
    kind = operation[0]
    if kind == "upsert":
        # One statement may not touch a row twice (ON CONFLICT): the last row per id wins.
        rows = [values(row, half_life_s) for row in {row["customer_id"]: row for row in operation[1]}.values()]
        await conn.execute(UPSERT, tenant, *([row[index] for row in rows] for index in range(len(COLUMNS))))
    elif kind == "copy":
        rows = [(tenant, *values(row, half_life_s, f"copy-{step}-{index}")) for index, row in enumerate(operation[1])]
        await conn.copy_records_to_table("customers", records=rows, columns=["tenant", *COLUMNS])
    elif kind == "move":  # the quadrant sweep's UPDATE
        await conn.execute(
            "UPDATE customers SET quadrant = $3 WHERE tenant = $1 AND customer_id = ANY($2::text[])",
            tenant, operation[1], operation[2],
        )  # fmt: skip
    else:
        await conn.execute("DELETE FROM customers WHERE tenant = $1 AND customer_id = ANY($2::text[])", tenant,
                           operation[1])  # fmt: skip


async def check(postgres, ops: list[tuple], half_life_s: float, in_transaction: bool) -> None:
    tenant = f"qt-{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn(postgres))
    try:
        transaction = conn.transaction()
        if in_transaction:  # several statements in one transaction: each fires its triggers
            await transaction.start()
        for step, operation in enumerate(ops):
            await apply(conn, tenant, operation, half_life_s, step)
        if in_transaction:
            await transaction.commit()

        key = lambda row: (row["latest_journey"], row["quadrant"], row["band"])  # noqa: E731
        totals = {key(row): dict(row) for row in await conn.fetch(TOTALS, tenant)}
        expected = {key(row): dict(row) for row in await conn.fetch(EXPECTED, tenant)}
        # Exactly: counts, and the numeric sums to the last digit (no residue of removed rows).
        assert totals == expected
        assert all(row["customers"] > 0 for row in totals.values())  # emptied bands are dropped
        # With no other writer folding, every statement folded its own deltas: the stored totals
        # alone are exact, and their emptied bands are gone.
        assert await conn.fetchval(PENDING, tenant) == 0
        assert {key(row): dict(row) for row in await conn.fetch(FOLDED, tenant)} == expected

        # And valued at a time, against the revenue of each customer computed from its own row.
        # Tolerance: revenue_rank keeps log2 of the revenue in a float of magnitude ~now/half-life,
        # whose last bit is worth a relative 0.7 * ulp(rank) of revenue (5e-9 for a 1-minute
        # half-life); each term's rounding to whole units adds at most 2 ** -47 (7e-15).
        now_s = (NOW + timedelta(hours=1)).timestamp()
        customers = await conn.fetch(
            "SELECT latest_journey, quadrant, experience_index, revenue_sum, last_event_at, revenue_rank "
            "FROM customers WHERE tenant = $1",
            tenant,
        )
        for journey in JOURNEYS:
            for quadrant in QUADRANTS:
                members = [row for row in customers if (row["latest_journey"], row["quadrant"]) == (journey, quadrant)]
                want = math.fsum(
                    row["revenue_sum"] * 2.0 ** ((row["last_event_at"].timestamp() - now_s) / half_life_s)
                    for row in members
                )
                bands = [(band, row) for (j, q, band), row in totals.items() if (j, q) == (journey, quadrant)]
                got = math.fsum(
                    band_revenue_at(float(row["revenue_units"]), band, now_s, half_life_s) for band, row in bands
                )
                worst_rank = max((abs(row["revenue_rank"]) for row in members if row["revenue_sum"] > 0), default=0.0)
                tolerance = 4 * math.ulp(worst_rank) + 1e-14
                assert math.isclose(got, want, rel_tol=tolerance, abs_tol=1e-300), (journey, quadrant, got, want)
                # Indexes: each rounded to 2 ** -40, so within half of that per customer.
                index_total = math.fsum(index_sum(float(row["index_units"])) for _, row in bands)
                want_index = math.fsum(row["experience_index"] for row in members)
                assert abs(index_total - want_index) <= len(members) * 2.0**-41 + 1e-15, (journey, quadrant)
    finally:
        await conn.execute("DELETE FROM customers WHERE tenant = $1", tenant)
        await conn.close()


SMALL = {"customer_id": "c1", "journey": "hotel", "quadrant": "growth", "experience_index": 0.1, "revenue": 1.0,
         "age_s": 3600.0}  # fmt: skip
WHALE = {**SMALL, "customer_id": "c2", "revenue": 200.0}  # in the same band as SMALL (ranks 230.9, 238.5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A whale leaves the quadrant of a small customer: float sums would leave the small one wrong by
# the whale's rounding error (~1e-9 of it).
@example(ops=[("upsert", [SMALL, WHALE]), ("move", ["c2"], "exemplary")], half_life_s=HALF_LIVES_S[0],
         in_transaction=False)  # fmt: skip
@given(ops=operations, half_life_s=st.sampled_from(HALF_LIVES_S), in_transaction=st.booleans())
def test_totals_equal_the_group_by_over_customers(postgres, ops, half_life_s, in_transaction):
    asyncio.run(check(postgres, ops, half_life_s, in_transaction))


async def test_totals_follow_truncate_and_rebuild_recomputes_them(postgres):
    tenant = f"qt-{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn(postgres))
    try:
        row = {"customer_id": "c1", "journey": "hotel", "quadrant": "growth", "experience_index": 1.5,
               "revenue": 1234.5, "age_s": 3600.0}  # fmt: skip
        await apply(conn, tenant, ("copy", [row, {**row, "revenue": 0.0}]), 90 * 86400.0, 0)
        kept = [dict(row) for row in await conn.fetch(TOTALS, tenant)]
        assert sum(row["customers"] for row in kept) == 2
        # Both in a transaction rolled back: the other tests' customers stay.
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute("DELETE FROM quadrant_totals WHERE tenant = $1", tenant)
            await conn.execute("SELECT quadrant_totals_rebuild()")
            assert [dict(row) for row in await conn.fetch(TOTALS, tenant)] == kept
            await conn.execute("TRUNCATE customers")
            assert await conn.fetchval("SELECT count(*) FROM quadrant_totals") == 0
            assert await conn.fetchval("SELECT count(*) FROM quadrant_total_deltas") == 0
        finally:
            await transaction.rollback()
    finally:
        await conn.execute("DELETE FROM customers WHERE tenant = $1", tenant)
        await conn.close()


async def test_writers_of_one_tenant_do_not_wait_for_each_other(postgres):
    """Two transactions write customers of one tenant (two scoring members, or the sweep): the
    second commits while the first is still open, without waiting for it, and the totals read
    what has committed, exactly, before and after the first commits and whoever folds."""
    tenant = f"qt-{uuid.uuid4().hex[:10]}"
    first, second, reader = [await asyncpg.connect(dsn(postgres)) for _ in range(3)]
    half_life_s = 90 * 86400.0
    row = {"customer_id": "c1", "journey": "hotel", "quadrant": "at_risk", "experience_index": -2.0,
           "revenue": 500.0, "age_s": 60.0}  # fmt: skip
    try:
        await second.execute("SET lock_timeout = '2s'")  # waiting for `first` fails the test
        open_transaction = first.transaction()
        await open_transaction.start()
        try:
            await apply(first, tenant, ("upsert", [row, {**row, "customer_id": "c2"}]), half_life_s, 0)
            # first now holds the fold; second appends its deltas and leaves them to a later fold.
            newcomer = {**row, "customer_id": "c3", "quadrant": "growth"}
            await apply(second, tenant, ("upsert", [newcomer]), half_life_s, 1)
            await apply(second, tenant, ("move", ["c3"], "exemplary"), half_life_s, 2)
            live = {r["quadrant"]: r["customers"] for r in await reader.fetch(TOTALS, tenant)}
            assert live == {"exemplary": 1}  # second's committed rows only
            assert await reader.fetchval(PENDING, tenant) > 0
            await open_transaction.commit()
        except BaseException:
            await open_transaction.rollback()
            raise
        live = {r["quadrant"]: r["customers"] for r in await reader.fetch(TOTALS, tenant)}
        assert live == {"at_risk": 2, "exemplary": 1}
        expected = [dict(r) for r in await reader.fetch(EXPECTED, tenant)]
        assert [dict(r) for r in await reader.fetch(TOTALS, tenant)] == expected
        # The next write folds what second left: the stored totals alone are exact again.
        await apply(second, tenant, ("delete", ["c2"]), half_life_s, 3)
        assert await reader.fetchval(PENDING, tenant) == 0
        assert [dict(r) for r in await reader.fetch(FOLDED, tenant)] == [
            dict(r) for r in await reader.fetch(EXPECTED, tenant)
        ]
    finally:
        await reader.execute("DELETE FROM customers WHERE tenant = $1", tenant)
        for conn in (first, second, reader):
            await conn.close()
