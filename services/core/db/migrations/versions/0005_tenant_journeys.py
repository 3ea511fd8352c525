"""Per-tenant journey maps, versioned and append-only: every change is a new version

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 01:05:00
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_journeys",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("journey", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        # The map as posted (valid against journey.schema.json); null: the journey was retired.
        sa.Column("document", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("created_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("tenant", "journey", "version"),
        sa.CheckConstraint("version >= 1", name="tenant_journeys_version_positive"),
    )


def downgrade() -> None:
    op.drop_table("tenant_journeys")
