"""machines.location: where each host stands, REGION/DC[/RACK] ('' : unknown), which
ranks the image servers a host fetches from (Dominator's MDB field `Location`)."""

from alembic import op
from sqlalchemy import text

revision = "mdb_0003"
down_revision = "mdb_0002"


def upgrade() -> None:
    """The column."""
    op.get_bind().execute(text(
        "ALTER TABLE machines ADD COLUMN location VARCHAR NOT NULL DEFAULT ''"))
