"""Answers served again (workers/answer_cache.py): requests.served_from says how a request was
answered without a call of its own (cache, semantic_cache, coalesced), requests.saved_cost_usd
and attempts.saved_cost_usd what the call that first gave the answer cost, so that usage reports
show what the cache saved reading requests only.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("served_from", sa.String(20), nullable=True))
        batch_op.add_column(
            sa.Column("saved_cost_usd", sa.Numeric(18, 9), nullable=False, server_default="0")
        )
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("saved_cost_usd", sa.Numeric(18, 9), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_column("saved_cost_usd")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("saved_cost_usd")
        batch_op.drop_column("served_from")
