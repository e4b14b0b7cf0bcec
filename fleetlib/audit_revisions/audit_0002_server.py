"""which server recorded each entry (several dominators share one log, issue 11)."""

import sqlalchemy as sa
from alembic import op

revision = "audit_0002"
down_revision = "audit_0001"


def upgrade() -> None:
    """A nullable server column: entries from before it are the log owner's own."""
    op.get_bind().execute(sa.text("ALTER TABLE audit_log ADD COLUMN server TEXT"))
