"""deploys (frozen history: the table DeployRow maps)."""

import sqlalchemy as sa
from alembic import op

revision = "deploys_0001"
down_revision = None


def upgrade() -> None:
    """One row per deploy, indexed by status and creation time."""
    conn = op.get_bind()
    conn.execute(sa.text(
        "CREATE TABLE deploys (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, "
        "image TEXT NOT NULL, dry_run INTEGER NOT NULL, request TEXT NOT NULL, "
        "status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, "
        "created_unix REAL NOT NULL, updated_unix REAL NOT NULL)"))
    conn.execute(sa.text("CREATE INDEX ix_deploys_status ON deploys (status)"))
    conn.execute(sa.text("CREATE INDEX ix_deploys_created ON deploys (created_unix)"))
