"""`python -m bench.customer_rows [--customers 10000 1000000] [--events 5000] [--rounds 8]`: what one
customers row costs the scoring transaction, by the table's size and by its indexes.

Figure 7 compares scoring's microseconds per event at 10k and at 1 M customers, and the customers
merge of services/scoring/store.py is the statement whose time differs most between the two
(pg_stat_statements of `python -m bench --only api scoring_growth --profile`). This measures that
statement alone. Batches of `--events` events of the shipped hotel journey (bench.data.EventFactory,
folded per customer by scoring's own code) are merged into tables that already hold each number of
customers (bench.data.generate_customers). Rounds alternate between the sizes, each batch in its
own committed transaction, as scoring commits. Then the same runs with the primary key as the
table's only index. It prints `name value unit` lines: the median microseconds per customer row,
the customer rows per event (how far a batch folds), and the ratios.
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

from bench import data
from bench.run import _count
from bench.stack import asyncpg_dsn
from services.core.db.engine import migrate
from services.core.embedded import EmbeddedPostgres
from services.core.events import TouchpointRecord
from services.core.scoring import HalfLives
from services.core.settings import Settings
from services.scoring import store
from services.scoring.consumer import to_scored_event


class CustomerBatches:
    """Batches of customer rows for one tenant per table size, each with its own event source."""

    def __init__(self, sizes: list[int], events: int):
        self.events = events
        self.journey = data.journeys()["hotel"]
        self.factories = {size: data.EventFactory(self.journey, size, f"rows-{size}", seed=size) for size in sizes}
        settings = Settings()
        self.half_lives = HalfLives(
            settings.customer_half_life_s, settings.trend_half_life_s, settings.revenue_half_life_s
        )
        self.thresholds = [
            (journey.id, journey.experience_threshold, journey.revenue_threshold)
            for journey in data.journeys().values()
        ]

    @staticmethod
    def tenant(size: int) -> str:
        return f"rows-{_count(size)}"

    def customer_rows(self, size: int) -> list[tuple]:
        """A batch folded per customer as scoring stages it (services/scoring/store.py)."""
        now = datetime.now(timezone.utc)
        tenant = self.tenant(size)
        events = [
            to_scored_event(TouchpointRecord.model_validate_json(self.factories[size].record(tenant, now)[1]))
            for _ in range(self.events)
        ]
        _, rows = store._state_rows({tenant: events}, self.half_lives)
        return rows

    async def merge(self, conn: asyncpg.Connection, size: int) -> tuple[float, int]:
        """Seconds the customers merge took for one batch, and the batch's customer rows."""
        rows = self.customer_rows(size)
        tenant = self.tenant(size)
        journeys, experience, revenue = (list(column) for column in zip(*self.thresholds))
        half_lives = self.half_lives
        async with conn.transaction():
            await conn.copy_records_to_table("scoring_customers", records=rows, schema_name="pg_temp")
            started = time.perf_counter()
            await conn.fetch(
                store._MERGE_CUSTOMERS,
                [tenant] * len(journeys), journeys, experience, revenue, time.time(),
                half_lives.index_s, half_lives.trend_s, half_lives.revenue_s, [], [],
            )  # fmt: skip
            return time.perf_counter() - started, len(rows)


async def _run(sizes: list[int], events: int, rounds: int, work_dir: Path) -> None:
    postgres = EmbeddedPostgres(work_dir / "postgres", durable=False)
    postgres.start()
    try:
        await asyncio.to_thread(migrate, postgres.url())
        conn = await asyncpg.connect(asyncpg_dsn(postgres.url()))
        batches = CustomerBatches(sizes, events)
        started = time.monotonic()
        for size in sizes:
            await data.generate_customers(conn, batches.tenant(size), size, stages_per_customer=2)
        print(f"# {' and '.join(map(_count, sizes))} customers generated in {time.monotonic() - started:.0f} s")
        await conn.execute(
            f"CREATE TEMP TABLE scoring_customers ({store._STAGING['scoring_customers']}) ON COMMIT DELETE ROWS"
        )
        baseline = sizes[0]
        for variant in ("all_indexes", "primary_key_only"):
            if variant == "primary_key_only":
                secondary = await conn.fetch(
                    "SELECT indexrelid::regclass::text AS name FROM pg_index "
                    "WHERE indrelid = 'customers'::regclass AND NOT indisprimary"
                )
                for index in secondary:
                    await conn.execute(f"DROP INDEX {index['name']}")
            per_row: dict[int, list[float]] = {size: [] for size in sizes}
            folded: dict[int, list[float]] = {size: [] for size in sizes}
            for _ in range(rounds):
                for size in sizes:  # alternating: the machine's noise falls on every size alike
                    seconds, rows = await batches.merge(conn, size)
                    per_row[size].append(seconds / rows * 1e6)
                    folded[size].append(rows / events)
            for size in sizes:
                name = f"customer_row_us_{_count(size)}_customers_{variant}"
                value = statistics.median(per_row[size])
                print(f"{name} {value:.1f} us/row")
                print(f"{name}.rows_per_event {statistics.mean(folded[size]):.3f}")
                if size != baseline:
                    ratio = value / statistics.median(per_row[baseline])
                    print(f"{name}.ratio {ratio:.3f} x  # against {_count(baseline)} customers")
        await conn.close()
    finally:
        postgres.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--events", type=int, default=Settings.model_fields["scoring_max_batch"].default)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="cem-rows-"))
    try:
        asyncio.run(_run(args.customers, args.events, args.rounds, work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
