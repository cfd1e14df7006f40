"""Alembic environment: the ledger's metadata, batch mode for SQLite's limited ALTER."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from db.engine import Database
from db.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or ""
assert url, "sqlalchemy.url must be set (db.migrate.alembic_config does it)"


def run_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    # The write engine: on SQLite its BEGIN IMMEDIATE keeps two migrators from interleaving.
    engine = Database(url).write_engine.execution_options()
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode alters a table by rebuilding it (copy, drop, rename), and with foreign keys
            # on, dropping a table that rows of another point at fails. Off for this connection, set
            # before any transaction (SQLite ignores it inside one); checked after.
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=True,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            assert not broken, f"the migration left rows pointing at nothing: {broken[:5]}"
    engine.dispose()


_ = pool  # imported for Alembic templates that expect it
if context.is_offline_mode():
    run_offline()
else:
    run_online()
