"""append-only audit log (frozen history; PostgreSQL added for the log dominators
share, issue 11: SQLite's statements are unchanged)."""

import sqlalchemy as sa
from alembic import op

revision = "audit_0001"
down_revision = None

# PostgreSQL: one function raises for every refused change (row triggers for UPDATE
# and DELETE, a statement trigger for TRUNCATE, which row triggers do not see).
POSTGRESQL = (
    "CREATE TABLE audit_log (id BIGSERIAL PRIMARY KEY, unix_ns BIGINT NOT NULL, "
    "who TEXT NOT NULL, action TEXT NOT NULL, summary TEXT NOT NULL, details TEXT NOT NULL)",
    "CREATE INDEX audit_log_unix ON audit_log (unix_ns)",
    "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$",
    "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
)


def upgrade() -> None:
    """The audit_log table, and triggers refusing any UPDATE or DELETE of it."""
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        for statement in POSTGRESQL:
            conn.execute(sa.text(statement))
        return
    if conn.dialect.name != "sqlite":
        raise ValueError("the audit log is kept in SQLite or PostgreSQL")
    conn.execute(sa.text(
        "CREATE TABLE audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "unix_ns INTEGER NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL, "
        "summary TEXT NOT NULL, details TEXT NOT NULL)"))
    conn.execute(sa.text("CREATE INDEX audit_log_unix ON audit_log (unix_ns)"))
    for verb in ("UPDATE", "DELETE"):
        conn.execute(sa.text(
            f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
            "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"))
