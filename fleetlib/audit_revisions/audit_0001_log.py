"""append-only audit log (frozen history)."""

import sqlalchemy as sa
from alembic import op

revision = "audit_0001"
down_revision = None


def upgrade() -> None:
    """The audit_log table, and triggers refusing any UPDATE or DELETE of it."""
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        raise ValueError("the audit log is kept in SQLite")
    conn.execute(sa.text(
        "CREATE TABLE audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "unix_ns INTEGER NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL, "
        "summary TEXT NOT NULL, details TEXT NOT NULL)"))
    conn.execute(sa.text("CREATE INDEX audit_log_unix ON audit_log (unix_ns)"))
    for verb in ("UPDATE", "DELETE"):
        conn.execute(sa.text(
            f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
            "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"))
