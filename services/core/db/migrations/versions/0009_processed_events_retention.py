"""An index on processed_events.scored_at, for the ledger's retention

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 05:30:00

processed_events (scoring's de-duplication ledger) grew forever. services/scoring/retention.py now
deletes the rows no copy of their event can need any more (scored more than max_event_age + a
margin ago), in bounded batches, and finds them through this index.

A B-tree, not BRIN. Rows arrive in scored_at order, so each insert lands on the index's rightmost
leaf (cheap: +1.5 ms, 4 %, on the ledger insert of a 2,000-event batch) and BRIN would be nearly
free at first; but once the retention deletes old rows, vacuum hands their pages to new rows, a
BRIN range's (min, max) then spans 37 days and every run would read every reused page (the whole
table in steady state; measured in docs/reliability.md). The B-tree finds exactly the expired rows
and the oldest one, whatever the heap order. Built CONCURRENTLY: a big ledger keeps taking inserts.
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        # A failed concurrent build leaves an invalid index of this name: drop it, then build.
        op.execute(
            "DO $$ BEGIN "
            "IF EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('processed_events_scored_at') "
            "AND NOT indisvalid) THEN DROP INDEX processed_events_scored_at; END IF; END $$"
        )
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS processed_events_scored_at ON processed_events (scored_at)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS processed_events_scored_at")
