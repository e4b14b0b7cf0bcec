"""machines.updated_unix and an index on required_image: when each row last changed
(0: before this revision), for `mdb list` and audits; and an index for the dominator's
"which machines require image X"."""

from alembic import op
from sqlalchemy import text

revision = "mdb_0002"
down_revision = "mdb_0001"


def upgrade() -> None:
    """The column and the index."""
    connection = op.get_bind()
    connection.execute(text(
        "ALTER TABLE machines ADD COLUMN updated_unix BIGINT NOT NULL DEFAULT 0"))
    connection.execute(text(
        "CREATE INDEX ix_machines_required_image ON machines (required_image)"))
