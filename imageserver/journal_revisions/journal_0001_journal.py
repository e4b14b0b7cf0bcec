"""image server journal (frozen history): identity, events, live images, tombstones and
the follower's position (imageserver/journal.py)."""

import sqlalchemy as sa
from alembic import op

revision = "journal_0001"
down_revision = None


def upgrade() -> None:
    """The journal's five tables."""
    statements = [
        "CREATE TABLE identity (singleton INTEGER PRIMARY KEY CHECK (singleton = 1), "
        "id TEXT NOT NULL, generation INTEGER NOT NULL)",
        "CREATE TABLE events (sequence INTEGER PRIMARY KEY AUTOINCREMENT, "
        "kind INTEGER NOT NULL, name TEXT NOT NULL, digest BLOB NOT NULL, "
        "expires_unix INTEGER NOT NULL, unix INTEGER NOT NULL)",
        "CREATE TABLE live (name TEXT PRIMARY KEY, digest BLOB NOT NULL, "
        "expires_unix INTEGER NOT NULL)",
        "CREATE TABLE tombstones (name TEXT PRIMARY KEY, digest BLOB NOT NULL, "
        "deleted_unix INTEGER NOT NULL)",
        "CREATE TABLE follower (singleton INTEGER PRIMARY KEY CHECK (singleton = 1), "
        "upstream_id TEXT NOT NULL, generation INTEGER NOT NULL, "
        "applied_sequence INTEGER NOT NULL, diverged INTEGER NOT NULL, "
        "ancestry TEXT NOT NULL)",
    ]
    conn = op.get_bind()
    for statement in statements:
        conn.execute(sa.text(statement))
