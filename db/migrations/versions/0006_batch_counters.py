"""batch_counters: a batch's counters spread over several rows, so that its requests' ends do not
queue on one row (db/batch_state.py)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_counters",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("succeeded_count", sa.Integer(), nullable=False),
        sa.Column("failed_count", sa.Integer(), nullable=False),
        sa.Column("cancelled_count", sa.Integer(), nullable=False),
        sa.Column("expired_count", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=18, scale=9), nullable=False),
        sa.Column("unpriced_attempts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_batch_counters_batch_id_batches")
        ),
        sa.PrimaryKeyConstraint("batch_id", "shard", name=op.f("pk_batch_counters")),
    )


def downgrade() -> None:
    op.drop_table("batch_counters")
