"""The image server journal's schema history (Alembic revisions, fleetlib.sql.schema)."""
