"""anomalies: the events table (what the pool noticed about a tenant); tenants.on_anomaly,
paused_at, paused_reason; requests.prompt_hash with the detector's indexes; webhook deliveries
that belong to no batch (an anomaly) or to no tenant (the operator's copy)

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("subject", JSON_DOC, nullable=False),
        sa.Column("detail", JSON_DOC, nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_events_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_tenant_id_created_at", ["tenant_id", "created_at"], unique=False)
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("on_anomaly", sa.String(length=8), server_default="none", nullable=False)
        )
        batch_op.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("paused_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prompt_hash", sa.String(length=16), nullable=True))
        batch_op.create_index("ix_requests_ended_at", ["ended_at"], unique=False)
        batch_op.create_index(
            "ix_requests_prompt_hash_created_at", ["prompt_hash", "created_at"], unique=False
        )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.alter_column("tenant_id", existing_type=sa.String(length=40), nullable=True)
        batch_op.alter_column("batch_id", existing_type=sa.String(length=40), nullable=True)


def downgrade() -> None:
    # Deliveries of no batch or no tenant cannot stay in the older schema.
    op.execute(
        "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries "
        "WHERE tenant_id IS NULL OR batch_id IS NULL)"
    )
    op.execute("DELETE FROM webhook_deliveries WHERE tenant_id IS NULL OR batch_id IS NULL")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.alter_column("batch_id", existing_type=sa.String(length=40), nullable=False)
        batch_op.alter_column("tenant_id", existing_type=sa.String(length=40), nullable=False)
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_prompt_hash_created_at")
        batch_op.drop_index("ix_requests_ended_at")
        batch_op.drop_column("prompt_hash")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("paused_reason")
        batch_op.drop_column("paused_at")
        batch_op.drop_column("on_anomaly")
    op.drop_table("events")
