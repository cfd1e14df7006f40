"""attempts.first_chunk_ms and attempts.generation_ms: a streamed call's time to first chunk and
the time it took to generate the rest (its latency minus the first); NULL for unstreamed calls

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("first_chunk_ms", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("generation_ms", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_column("generation_ms")
        batch_op.drop_column("first_chunk_ms")
