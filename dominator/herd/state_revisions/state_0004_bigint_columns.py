"""64-bit integer columns on PostgreSQL (frozen history): its INTEGER is 32 bits, so a
computed file over 2 GiB or a time past 2038 overflowed; SQLite's already hold 64."""

import sqlalchemy as sa
from alembic import op

revision = "state_0004"
down_revision = "state_0003"

COLUMNS = {
    "hosts": ("intrusion_unix", "last_sync_unix", "paused_unix", "paused_until_unix"),
    "desired_images": ("last_unix",),
    "desired_computed": ("size",),
    "api_tokens": ("created_unix", "last_used_unix", "revoked_unix"),
}


def upgrade() -> None:
    """ALTER ... TYPE BIGINT on PostgreSQL; nothing on SQLite."""
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        alters = ", ".join(f"ALTER COLUMN {column} TYPE BIGINT" for column in columns)
        conn.execute(sa.text(f"ALTER TABLE {table} {alters}"))
