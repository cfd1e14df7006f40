"""Leases instead of worker heartbeats: requests.owner becomes requests.lease (a random token per
run), attempts remember the lease of the run that made them, and the "fatal" outcome is called
"fail", the policy's own word for it.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.alter_column("owner", new_column_name="lease", type_=sa.String(length=64))
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease", sa.String(length=64), nullable=True))
    # A run that was RUNNING under a worker name has no lease any more: the recovery sweep
    # requeues it (its in-flight attempts are then costed as lost).
    op.execute("UPDATE requests SET lease = NULL WHERE status = 'running'")
    op.execute("UPDATE attempts SET outcome = 'fail' WHERE outcome = 'fatal'")


def downgrade() -> None:
    op.execute("UPDATE attempts SET outcome = 'fatal' WHERE outcome = 'fail'")
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_column("lease")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.alter_column("lease", new_column_name="owner", type_=sa.String(length=200))
