"""settings, hosts and desired states (frozen history: the tables the models map)."""

import sqlalchemy as sa
from alembic import op

revision = "state_0001"
down_revision = None


def upgrade() -> None:
    """The first state file."""
    conn = op.get_bind()
    conn.execute(sa.text("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"))
    conn.execute(sa.text(
        "CREATE TABLE hosts (hostname TEXT PRIMARY KEY, safety_cleared INTEGER NOT NULL "
        "DEFAULT 0, intrusion_paths TEXT, intrusion_unix INTEGER, last_sync_unix INTEGER, "
        "current_image TEXT)"))
    conn.execute(sa.text(
        "CREATE TABLE desired_images (hostname TEXT NOT NULL, image TEXT NOT NULL, "
        "last_unix INTEGER NOT NULL, PRIMARY KEY (hostname, image))"))
    conn.execute(sa.text(
        "CREATE TABLE desired_computed (hostname TEXT NOT NULL, path TEXT NOT NULL, "
        "hash TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (hostname, path, hash))"))
