"""named, scoped HTTP API tokens (frozen history, dominator/herd/tokens.py)."""

import sqlalchemy as sa
from alembic import op

revision = "state_0002"
down_revision = "state_0001"


def upgrade() -> None:
    """The api_tokens table."""
    op.get_bind().execute(sa.text(
        "CREATE TABLE api_tokens (name TEXT PRIMARY KEY, scope TEXT NOT NULL, "
        "sha256 TEXT NOT NULL UNIQUE, created_unix INTEGER NOT NULL, created_by TEXT NOT NULL, "
        "last_used_unix INTEGER, revoked_unix INTEGER, revoked_by TEXT)"))
