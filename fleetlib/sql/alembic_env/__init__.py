"""Alembic's environment (env.py), shared by every migration history (fleetlib.sql.schema)."""
