"""The audit log's schema history (Alembic revisions, fleetlib.sql.schema)."""
