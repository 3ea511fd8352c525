"""Free room on the pages of customer_stages, so that scoring's updates of it stay HOT

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24 05:30:00

Scoring updates one customer_stages row per (customer, stage) of a batch, changing only columns
that no index holds (the decayed sums and their reference time), so each update could be HOT:
the new row version on the same page, no index entry. With the default fillfactor of 100 every
page is filled by inserts, so at a million customers ~70 % of these updates moved the row to
another page and inserted a primary-key entry (bench at 1 M customers: 29 % HOT; with this
migration 100 %). A fillfactor of 90 leaves ~800 bytes per page, several row versions, and pruning
frees them again before the page's rows come back. A batch that updates most rows of a page (few
customers) still fills its room, as before.

The setting applies to pages filled from now on; pages already full keep no room until a rewrite.
An existing deployment with many customers rewrites the table once in a quiet moment
(`VACUUM FULL customer_stages`, an exclusive lock for its duration, or pg_repack without one);
without that, the old pages gain room only as vacuum frees the versions of non-HOT updates.
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

FILLFACTORS = {"customer_stages": 90}


def upgrade() -> None:
    # SHARE UPDATE EXCLUSIVE: scoring and the API keep reading and writing meanwhile.
    for table, fillfactor in FILLFACTORS.items():
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactor})")


def downgrade() -> None:
    for table in FILLFACTORS:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
