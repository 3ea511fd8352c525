"""Retention of processed_events, scoring's de-duplication ledger.

Every scored event adds a row (1,000 events/s: 86 M rows a day) and a row is needed only while a
copy of its event can still reach scoring. When can that be? Let S be the row's `scored_at`
(Postgres' clock, the scoring transaction's start) and O the event's occurred_at.

- The first copy was accepted by ingest at received_at R1 <= S, and ingest and scoring accept an
  event only if O <= received_at + max_future_skew (+ 60 s slack in scoring): O <= S + skew + 60 s.
- A later copy (a client's retry, re-ingested: new received_at R2) is accepted only if
  R2 - O <= max_event_age (+ 60 s slack), so R2 <= S + skew + max_event_age + 120 s.
- A copy sits in the touchpoint topic at most the topic's retention (then Kafka deletes it) before
  it is consumed; a redelivery of the same record (a rebalance, a crash before the commit) is the
  same bound. So every copy is consumed before S + max_event_age + skew + 120 s + topic retention.

A row whose scored_at is older than max_event_age + max_future_skew + 120 s + margin, with
`dedup_retention_margin_days` >= the touchpoint topic's retention, therefore has no copy left that
scoring would accept, and is deleted. Where this does not hold (a long-kept DLQ replayed, a topic
retention above the margin, a raised max_event_age, clocks off by more than the slack):
docs/reliability.md, "Retention of the de-duplication ledger".

The deletion runs every `dedup_retention_interval_s` in every scoring replica; only the one that
takes a session advisory lock works. It deletes `dedup_retention_batch_rows` rows per statement,
each its own short transaction, with a pause between batches, so that it never holds locks long or
starves the scoring batches. The rows are found through the B-tree on scored_at (migration 0009
says why not BRIN), oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import metrics
from services.core.settings import DAY_S, Settings

log = logging.getLogger("cem.scoring.retention")

# pg_try_advisory_lock(class, key): 'CDR' (CEM dedup retention), apart from the other classes.
LOCK_CLASS = 0x434452
LOCK_KEY = 1
# Ingest and scoring each allow 60 s of slack on the accepted window (consumer.py): twice that.
WINDOW_SLACK_S = 120.0
# Between two batches: scoring batches waiting on the disk or a row get their turn.
PAUSE_BETWEEN_BATCHES_S = 0.05

# The cutoff is on Postgres' clock, as scored_at. ctid = ANY(ARRAY(...)) deletes by tuple id (a Tid
# Scan), no second index search; processed_events rows are never updated, so a tuple id found in
# the statement's snapshot is the row. Each batch starts at the last one's newest scored_at, so it
# does not walk again over the index entries of the rows deleted before it (dead until vacuum).
_DELETE_BATCH = text(
    "WITH gone AS ("
    " DELETE FROM processed_events WHERE ctid = ANY(ARRAY("
    "  SELECT ctid FROM processed_events"
    "  WHERE scored_at >= CAST(:after AS timestamptz)"
    "  AND scored_at < now() - make_interval(secs => CAST(:retention_s AS double precision))"
    "  ORDER BY scored_at LIMIT :limit"
    " )) RETURNING scored_at"
    ") SELECT count(*) AS deleted, max(scored_at) AS newest FROM gone"
)
_OLDEST_AGE = text("SELECT coalesce(extract(epoch FROM now() - min(scored_at)), 0) FROM processed_events")


def dedup_retention_s(settings: Settings) -> float:
    """How long a processed_events row is kept after it was scored (see the module docstring)."""
    margin_s = settings.dedup_retention_margin_days * DAY_S
    return settings.max_event_age_s + settings.max_future_skew_s + WINDOW_SLACK_S + margin_s


@dataclass(frozen=True)
class RetentionRun:
    deleted: int
    batches: int
    seconds: float
    oldest_age_s: float  # of the oldest row left


async def delete_expired_events(engine: AsyncEngine, settings: Settings) -> RetentionRun | None:
    """Delete every expired processed_events row, in batches; None if another replica is at it."""
    started = time.monotonic()
    retention_s = dedup_retention_s(settings)
    async with engine.connect() as conn:
        leader = await conn.scalar(
            text("SELECT pg_try_advisory_lock(:lock_class, :key)"), {"lock_class": LOCK_CLASS, "key": LOCK_KEY}
        )
        await conn.commit()
        if not leader:
            return None
        try:
            deleted = batches = 0
            after = datetime.min.replace(tzinfo=timezone.utc)
            while True:
                count, newest = (
                    await conn.execute(
                        _DELETE_BATCH,
                        {"after": after, "retention_s": retention_s, "limit": settings.dedup_retention_batch_rows},
                    )
                ).one()
                await conn.commit()  # one short transaction per batch
                after = newest or after
                deleted += count
                batches += 1
                metrics.SCORING_DEDUP_ROWS_DELETED.inc(count)
                if count < settings.dedup_retention_batch_rows:
                    break
                await asyncio.sleep(PAUSE_BETWEEN_BATCHES_S)
            oldest_age_s = float(await conn.scalar(_OLDEST_AGE))  # one index probe
            await conn.execute(
                text("SELECT pg_advisory_unlock(:lock_class, :key)"), {"lock_class": LOCK_CLASS, "key": LOCK_KEY}
            )
            await conn.commit()
        except BaseException:
            # The session lock must not go back to the pool with the connection.
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise
    metrics.SCORING_DEDUP_LAST_RUN.set(time.time())
    metrics.SCORING_DEDUP_OLDEST_AGE.set(oldest_age_s)
    return RetentionRun(deleted, batches, time.monotonic() - started, oldest_age_s)


async def keep_dedup_ledger_trimmed(engine: AsyncEngine, settings: Settings) -> None:
    """Run delete_expired_events every dedup_retention_interval_s, forever (cancel to stop)."""
    while True:
        await asyncio.sleep(settings.dedup_retention_interval_s)
        try:
            run = await delete_expired_events(engine, settings)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the database may be down: the consumer reports it; retry later
            log.warning("dedup retention failed: %s", str(error)[:300])
            continue
        if run is not None:
            log.info(
                "dedup retention: deleted %d processed_events rows scored more than %.1f days ago "
                "(%d batches, %.2f s); the oldest row left is %.1f days old",
                run.deleted, dedup_retention_s(settings) / DAY_S, run.batches, run.seconds, run.oldest_age_s / DAY_S,
            )  # fmt: skip
