"""The ledger: typed models, sessions, migrations. Postgres in production, SQLite embedded."""
