"""The per-stage pre-sums (migration 0008) equal the hour and day roll-ups summed per stage.

Random writes to stage_buckets in the shapes its writers use (tests/integration/test_stage_rollups.py:
the scoring upsert, COPY, UPDATE, DELETE), which reach the roll-ups through their triggers and the
pre-sums through theirs; then every pre-sum row must equal a GROUP BY of the roll-up rows, and no
pre-sum row may be left for a stage and period without roll-up rows. Values are multiples of 1/4,
so float sums are exact in any order and the comparison is exact. The windows read through the API
are checked against the minute rows by test_stage_rollups.py.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_stage_rollups import COUNTS, SUMS, apply, dsn, operations

pytestmark = pytest.mark.integration

VALUES = (*COUNTS, *SUMS)
PRESUMS = (("stage_totals_hourly", "stage_buckets_hourly", "hour"), ("stage_totals_daily", "stage_buckets_daily", "day"))


async def presums_and_references(conn: asyncpg.Connection, tenant: str) -> list[tuple[dict, dict]]:
    """(pre-sum rows, roll-up rows summed per stage) per period, keyed by (journey, stage, period)."""
    pairs = []
    for table, rollup, period in PRESUMS:
        columns = ", ".join(VALUES)
        presum = await conn.fetch(
            f"SELECT journey, stage, {period}, {columns}, gap_histogram FROM {table} WHERE tenant = $1", tenant
        )
        bins = ", ".join(f"sum(gap_histogram[{index}])::bigint" for index in range(1, 41))
        reference = await conn.fetch(
            f"SELECT journey, stage, {period}, {', '.join(f'sum({name}) AS {name}' for name in VALUES)}, "
            f"ARRAY[{bins}] AS gap_histogram FROM {rollup} WHERE tenant = $1 GROUP BY 1, 2, 3",
            tenant,
        )
        as_dict = lambda rows: {tuple(row[:3]): (*(float(v) for v in row[3:-1]), list(row[-1])) for row in rows}  # noqa: E731
        pairs.append((as_dict(presum), as_dict(reference)))
    return pairs


async def check(postgres, ops: list[tuple], in_transaction: bool) -> None:
    tenant = f"sp-{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn(postgres))
    try:
        transaction = conn.transaction()
        if in_transaction:
            await transaction.start()
        for operation in ops:
            await apply(conn, tenant, operation)
        if in_transaction:
            await transaction.commit()
        for presum, reference in await presums_and_references(conn, tenant):
            assert presum == reference
    finally:
        await conn.execute("DELETE FROM stage_buckets WHERE tenant = $1", tenant)
        for presum, _ in await presums_and_references(conn, tenant):
            assert presum == {}  # the deletes emptied them
        await conn.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, in_transaction=st.booleans())
def test_presums_are_the_rollups_summed_per_stage(postgres, ops, in_transaction):
    asyncio.run(check(postgres, ops, in_transaction))


async def test_a_stage_left_without_buckets_in_an_hour_loses_its_presum_rows(postgres):
    tenant = f"sp-{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn(postgres))

    def bucket(stage: str, minute: int, touchpoint: str) -> dict:
        return {"key": (stage, minute, touchpoint, ""), "counts": (1, 0, 0, 0), "sums": (0.25,) * len(SUMS),
                "histogram": [1] + [0] * 39}  # fmt: skip

    try:
        # BASE is 21:17: minutes 0 and 1 are in the 21:00 hour, 200 in the next day.
        await apply(conn, tenant, ("upsert", [bucket("s1", 0, ""), bucket("s1", 1, "desk"), bucket("s2", 200, "")]))
        await apply(conn, tenant, ("delete", (200, 1)))  # s2's only bucket
        hours = await conn.fetch("SELECT stage, events FROM stage_totals_hourly WHERE tenant = $1", tenant)
        assert [tuple(row) for row in hours] == [("s1", 2)]
        days = await conn.fetch("SELECT stage, events FROM stage_totals_daily WHERE tenant = $1", tenant)
        assert [tuple(row) for row in days] == [("s1", 2)]
        await apply(conn, tenant, ("delete", (1, 1)))  # one of s1's two keys in that hour: the row stays
        hours = await conn.fetch("SELECT stage, events FROM stage_totals_hourly WHERE tenant = $1", tenant)
        assert [tuple(row) for row in hours] == [("s1", 1)]
    finally:
        await conn.execute("DELETE FROM stage_buckets WHERE tenant = $1", tenant)
        await conn.close()
