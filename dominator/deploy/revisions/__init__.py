"""The deploys table's schema history (Alembic revisions, fleetlib.sql.schema)."""
