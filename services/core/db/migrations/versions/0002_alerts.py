"""alerts: the alerts, their transition log, the outbox relay positions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:00:00
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("journey", sa.Text(), nullable=False),
        sa.Column("severity", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revenue_at_stake", sa.Double(), nullable=False),
        sa.Column("evidence", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("acknowledged_by", sa.Text(), nullable=True),
        sa.Column("resolved_by", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("tenant", "id"),
    )
    # One alert per (tenant, kind, subject) that is not resolved.
    op.create_index(
        "alerts_one_unresolved_per_subject",
        "alerts",
        ["tenant", "kind", "subject"],
        unique=True,
        postgresql_where=sa.text("status <> 'resolved'"),
    )
    op.create_index("alerts_opened", "alerts", ["tenant", sa.literal_column("opened_at DESC"), "id"], unique=False)
    op.create_index(
        "alerts_revenue_at_stake", "alerts", ["tenant", sa.literal_column("revenue_at_stake DESC"), "id"], unique=False
    )
    op.create_index("alerts_subject", "alerts", ["tenant", "subject"], unique=False)

    op.create_table(
        "alert_transitions",
        sa.Column("seq", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("alert_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("from_status", sa.Text(), nullable=True),
        sa.Column("to_status", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index("alert_transitions_tenant_seq", "alert_transitions", ["tenant", "seq"], unique=False)

    op.create_table(
        "alert_outbox_positions",
        sa.Column("relay", sa.Text(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("relay"),
    )


def downgrade() -> None:
    op.drop_table("alert_outbox_positions")
    op.drop_index("alert_transitions_tenant_seq", table_name="alert_transitions")
    op.drop_table("alert_transitions")
    op.drop_index("alerts_subject", table_name="alerts")
    op.drop_index("alerts_revenue_at_stake", table_name="alerts")
    op.drop_index("alerts_opened", table_name="alerts")
    op.drop_index("alerts_one_unresolved_per_subject", table_name="alerts")
    op.drop_table("alerts")
