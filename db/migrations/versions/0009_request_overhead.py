"""requests.overhead_cost_usd and requests.unpriced_attempts: what a request's calls that did not
answer cost, and how many of its calls had no price, kept with its other sums so that a usage
report reads requests only (db/usage_sql.py). Existing rows are filled from their attempts.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("overhead_cost_usd", sa.Numeric(18, 9), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("unpriced_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        """
        UPDATE requests SET
          overhead_cost_usd = COALESCE((SELECT SUM(a.cost_usd) FROM attempts a
             WHERE a.request_id = requests.id AND a.outcome NOT IN ('success', 'in_flight')), 0),
          unpriced_attempts = (SELECT COUNT(*) FROM attempts a
             WHERE a.request_id = requests.id AND a.cost_usd IS NULL AND a.outcome != 'in_flight')
        WHERE EXISTS (SELECT 1 FROM attempts a WHERE a.request_id = requests.id)
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("unpriced_attempts")
        batch_op.drop_column("overhead_cost_usd")
