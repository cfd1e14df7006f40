"""attempts.cache_read_tokens and cache_write_tokens: of a call's input tokens, those the provider
read from or wrote to its prompt cache (priced at its cache rates); the same sums on requests, so
that a usage report still reads requests only. Existing rows are 0: nothing recorded them before.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_TABLES = ("attempts", "requests")
_COLUMNS = ("cache_read_tokens", "cache_write_tokens")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in _COLUMNS:
                batch_op.add_column(sa.Column(column, sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in reversed(_COLUMNS):
                batch_op.drop_column(column)
