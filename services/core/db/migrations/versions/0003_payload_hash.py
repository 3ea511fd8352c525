"""payload hash of each processed event: a retry (same payload) from a conflicting reuse of an event id

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 12:00:00
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: the rows scored before this revision have no hash (no conflict is claimed for them).
    # Adding a nullable column without a default is a catalogue change only, instant on a large table.
    op.add_column("processed_events", sa.Column("payload_hash", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("processed_events", "payload_hash")
