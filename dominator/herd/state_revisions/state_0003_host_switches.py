"""per-host pauses and disruption allowances (frozen history)."""

import sqlalchemy as sa
from alembic import op

revision = "state_0003"
down_revision = "state_0002"


def upgrade() -> None:
    """The hosts table's pause and disruption columns."""
    conn = op.get_bind()
    for column in ("disruption_allowed INTEGER NOT NULL DEFAULT 0", "paused_by TEXT",
                   "paused_reason TEXT", "paused_unix INTEGER", "paused_until_unix INTEGER"):
        conn.execute(sa.text(f"ALTER TABLE hosts ADD COLUMN {column}"))
