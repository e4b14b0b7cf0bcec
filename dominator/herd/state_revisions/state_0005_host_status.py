"""host status rows, so every dominator on a shared database shows every host (frozen
history, dominator/herd/statusrows.py): one row per host written by the dominator that
supervises it, and one heartbeat row per writing dominator. `updated` is unix seconds
by the database's clock."""

import sqlalchemy as sa
from alembic import op

revision = "state_0005"
down_revision = "state_0004"


def upgrade() -> None:
    """The host_status and host_status_writers tables."""
    conn = op.get_bind()
    conn.execute(sa.text(
        "CREATE TABLE host_status (hostname TEXT PRIMARY KEY, owner TEXT NOT NULL, "
        "status TEXT NOT NULL, last_error TEXT NOT NULL, repeats INTEGER NOT NULL, "
        "last_poll_unix BIGINT NOT NULL, last_scan_unix BIGINT NOT NULL, "
        "last_sync_unix BIGINT NOT NULL, change_window_ns BIGINT NOT NULL, "
        "current_image TEXT NOT NULL, kept_paths TEXT NOT NULL, history TEXT NOT NULL, "
        "updated DOUBLE PRECISION NOT NULL)"))
    conn.execute(sa.text("CREATE INDEX host_status_updated ON host_status (updated)"))
    conn.execute(sa.text(
        "CREATE TABLE host_status_writers (owner TEXT PRIMARY KEY, "
        "updated DOUBLE PRECISION NOT NULL)"))
