"""budgets: what a tenant (or one tag of it) may spend per UTC day or month, and its degradation
ladder; enforced at admission in Redis, rebuilt from the ledger

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("tag_key", sa.String(length=100), nullable=True),
        sa.Column("tag_value", sa.String(length=200), nullable=True),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("limit_usd", sa.Numeric(precision=18, scale=9), nullable=False),
        sa.Column("ladder", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("on_anomaly", sa.String(length=8), server_default="none", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_budgets_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_budgets"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_budgets_tenant_id_name"),
    )


def downgrade() -> None:
    op.drop_table("budgets")
