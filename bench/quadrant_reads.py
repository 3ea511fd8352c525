"""`python -m bench.quadrant_reads [--customers 10000 1000000] [--rounds 10]`: what the per-quadrant
customers and revenue of a tenant cost to read, by the tenant's size.

Scoring's gauges (`cem_customers`, `cem_revenue`) and the positioning map need them. Read from the
totals the customers triggers keep (services.core.db.quadrant_totals, migrations 0007 and 0011)
they should cost the same at any size; a GROUP BY over the tenant's customers, which the gauges
ran before, grows with it. Each size is one tenant of bench.data.generate_customers; rounds
alternate between sizes and ways. Prints `name value unit` lines: median milliseconds per read,
and the scan's ratio against the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
from sqlalchemy import text

from bench import data
from bench.run import _count
from bench.stack import asyncpg_dsn
from services.core.db.engine import create_engine, migrate
from services.core.db.quadrant_totals import quadrant_sums
from services.core.embedded import EmbeddedPostgres

HALF_LIFE_S = 90 * 86400.0
SCAN = text(
    "SELECT quadrant, count(*) AS customers, "
    "sum(revenue_sum * power(2, least(0, extract(epoch FROM last_event_at - :now)) / :half_life)) AS revenue "
    "FROM customers WHERE tenant = :tenant GROUP BY quadrant"
)


async def _run(sizes: list[int], rounds: int, work_dir: Path) -> None:
    postgres = EmbeddedPostgres(work_dir / "postgres", durable=False)
    postgres.start()
    engine = create_engine(postgres.url())
    try:
        await asyncio.to_thread(migrate, postgres.url())
        conn = await asyncpg.connect(asyncpg_dsn(postgres.url()))
        for size in sizes:
            await data.generate_customers(conn, f"quadrants-{size}", size, stages_per_customer=1)
        await conn.execute("VACUUM ANALYZE customers")
        await conn.close()

        async def totals(connection, tenant: str, now: datetime) -> int:
            sums = await quadrant_sums(connection, tenant, now, HALF_LIFE_S)
            return sum(figures.customers for figures in sums.values())

        async def scan(connection, tenant: str, now: datetime) -> int:
            rows = await connection.execute(SCAN, {"tenant": tenant, "now": now, "half_life": HALF_LIFE_S})
            return sum(row.customers for row in rows)

        ways = {"totals": totals, "scan": scan}
        timings: dict[tuple[str, int], list[float]] = {(way, size): [] for way in ways for size in sizes}
        async with engine.connect() as connection:
            for _ in range(rounds):
                for size in sizes:
                    for way, read in ways.items():
                        started = time.perf_counter()
                        counted = await read(connection, f"quadrants-{size}", datetime.now(timezone.utc))
                        timings[(way, size)].append((time.perf_counter() - started) * 1e3)
                        if counted != size:  # both ways must see every customer
                            raise SystemExit(f"{way} counted {counted} customers of {size}")
        for size in sizes:
            medians = {way: statistics.median(timings[(way, size)]) for way in ways}
            for way, value in medians.items():
                print(f"quadrant_sums_ms_{_count(size)}_customers_{way} {value:.2f} ms")
            print(f"quadrant_sums_ms_{_count(size)}_customers_scan.ratio {medians['scan'] / medians['totals']:.1f} x")
    finally:
        await engine.dispose()
        postgres.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="cem-quadrants-"))
    try:
        asyncio.run(_run(args.customers, args.rounds, work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
