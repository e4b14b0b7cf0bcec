"""The dominator state file's schema history (Alembic revisions, fleetlib.sql.schema)."""
